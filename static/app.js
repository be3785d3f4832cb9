/* wav2mp3's page: create a user or sign in, upload WAVs through the service's resumable (tus 1.0.0)
   endpoint with the small client below, go on with unfinished uploads, play, share and download the MP3s
   (one at a time or as one ZIP). In English or Russian: the words are in static/i18n/page.<language>.json.
   No framework, no build step. */
(() => {
  'use strict';

  const CHUNK = 5 * 1024 * 1024; // bytes per PATCH: a pause or a retry costs at most this much again
  const PARALLEL = 3; // uploads at once; the others wait their turn
  const BACKOFF = [500, 1000, 2000, 4000, 8000]; // then every STEADY ms, for as long as the page is open
  const STEADY = 10000;
  const STALL = 30000; // a PATCH whose bytes stop moving this long is given up and retried
  const PAGE = 20;
  const ZIP_MAX = 100; // record ids in one POST /users/{id}/records.zip
  const AUTH_KEY = 'wav2mp3.auth';
  const OPTIONS_KEY = 'wav2mp3.options';
  const LANGUAGE_KEY = 'wav2mp3.language';
  const FP_KEY = 'wav2mp3.upload:'; // + JSON [user id, name, size, lastModified, options] -> {url}
  const TUS = { 'Tus-Resumable': '1.0.0' };
  const LIVE = ['queued', 'uploading', 'waiting', 'converting', 'paused'];
  const LANGUAGES = ['en', 'ru'];
  const BITRATES = [32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320];
  const BITRATE_NOTES = { 64: 'settings.kbpsSpeech', 128: 'settings.kbpsUsual', 320: 'settings.kbpsLargest' };
  const VBR_KBPS = [245, 225, 190, 175, 165, 130, 115, 100, 85, 65]; // LAME's -V0..-V9, roughly
  const VBR_NOTES = { 0: 'settings.vbrBest', 2: 'settings.vbrRecommended', 9: 'settings.vbrSmallest' };
  // The service's words for a name taken by a record, in English and as static/i18n/errors.ru.json has them.
  const RECORD_HOLDS_NAME = /already has a record|уже есть запись/;

  const $ = (id) => document.getElementById(id);
  const url = (path) => new URL(path, document.baseURI).href; // relative: works under a proxy's path prefix
  const sameUrl = (a, b) => Boolean(a && b) && url(a) === url(b);
  const enc = encodeURIComponent;
  const clone = (id) => $(id).content.firstElementChild.cloneNode(true);

  let language = 'en';
  let strings = {}; // the table of the language shown
  let auth = null; // {user_id, access_token, name}
  let service = null; // GET /service, once answered: {signup, retention_days, max_upload_bytes}
  let usage = null; // GET /users/{id}, as last answered
  let usageAsked = 0; // counts the usage requests: an answer for an older one is dropped
  let cursor = null; // next_cursor of the records shown
  let recordsFailed = false;
  let listing = 0; // counts the lists shown: an answer for an older one is dropped
  let serverUploads = []; // GET /users/{id}/uploads: this user's unfinished uploads that have a name
  let unfinishedAsked = 0;
  let batch = []; // the uploads chosen since the list was last idle: files done, bytes, time left
  let batchSamples = [];
  const uploads = [];
  const shown = new Map(); // record_id -> <li> in "Your MP3s"
  const selected = new Set(); // record ids chosen for a ZIP
  const unfinishedRows = new Map(); // upload url -> <li> in "Unfinished uploads"
  const tables = new Map(); // language -> its table, once loaded
  const said = new WeakMap(); // element -> {text or attribute name: message}, to say again in another language

  const store = {
    get(key) { try { return JSON.parse(localStorage.getItem(key)); } catch { return null; } },
    set(key, value) { try { localStorage.setItem(key, JSON.stringify(value)); } catch { /* storage off: no resume after a reload */ } },
    del(key) { try { localStorage.removeItem(key); } catch { /* idem */ } },
    keys() { try { return Object.keys(localStorage); } catch { return []; } },
  };

  // Words #######################################################################
  // A message is a string (the service's own words, shown as they come) or a function that makes one from
  // the table: say() remembers it, so that a switch of language says everything again.

  function t(key, values = {}) {
    let text = strings[key];
    if (text && typeof text === 'object') text = text[new Intl.PluralRules(language).select(values.count)] || text.other;
    if (typeof text !== 'string') return key;
    return text.replace(/\{(\w+)\}/g, (whole, name) => {
      if (!(name in values)) return whole;
      return typeof values[name] === 'number' ? format({}).format(values[name]) : String(values[name]);
    });
  }

  const T = (key, values) => () => t(key, values);

  function say(element, message, attribute = 'text') {
    let kept = said.get(element);
    if (!kept) said.set(element, (kept = {}));
    kept[attribute] = message;
    element.dataset.said = '';
    const text = typeof message === 'function' ? message() : message == null ? '' : String(message);
    if (attribute !== 'text') element.setAttribute(attribute, text);
    else if (element.textContent !== text) element.textContent = text;
  }

  function translate(root) { // the page's fixed words, by their keys
    for (const element of root.querySelectorAll('[data-t]')) element.textContent = t(element.dataset.t);
    for (const element of root.querySelectorAll('[data-t-aria-label]')) element.setAttribute('aria-label', t(element.dataset.tAriaLabel));
  }

  function chosenLanguage() { // the switch's choice, else the browser's first language the page speaks
    const saved = store.get(LANGUAGE_KEY);
    if (LANGUAGES.includes(saved)) return saved;
    for (const tag of navigator.languages || [navigator.language]) {
      const primary = String(tag).toLowerCase().split('-')[0];
      if (LANGUAGES.includes(primary)) return primary;
    }
    return 'en';
  }

  async function table(code) {
    if (!tables.has(code)) {
      try {
        const res = await fetch(url(`static/i18n/page.${code}.json`));
        if (res.ok) tables.set(code, await res.json());
      } catch { /* not now: the caller falls back */ }
    }
    return tables.get(code) || null;
  }

  async function useLanguage(code) {
    let words = await table(code);
    if (!words && code !== 'en') words = await table((code = 'en'));
    if (!words) return;
    language = code;
    strings = words;
    formats.clear();
    document.documentElement.lang = code;
    document.title = t('title');
    translate(document);
    for (const template of document.querySelectorAll('template')) translate(template.content);
    $('language').lang = code === 'en' ? 'ru' : 'en';
    $('language').hidden = false;
    buildOptions();
    for (const element of document.querySelectorAll('[data-said]')) {
      for (const [attribute, message] of Object.entries(said.get(element) || {})) say(element, message, attribute);
    }
  }

  // Numbers, sizes and dates in the language's format ###########################

  const formats = new Map();
  function format(options, kind = 'number') {
    const key = kind + JSON.stringify(options);
    if (!formats.has(key)) formats.set(key, kind === 'date' ? new Intl.DateTimeFormat(language, options) : new Intl.NumberFormat(language, options));
    return formats.get(key);
  }

  const unit = (name, n, digits = 0, display = 'long') =>
    format({ style: 'unit', unit: name, unitDisplay: display, minimumFractionDigits: digits, maximumFractionDigits: digits }).format(n);

  function bytes(n) {
    if (n < 1000) return t('bytes', { count: Math.round(n) });
    const units = ['kilobyte', 'megabyte', 'gigabyte', 'terabyte'];
    let i = -1;
    do { n /= 1000; i++; } while (n >= 999.5 && i < units.length - 1);
    return unit(units[i], n, n < 10 ? 1 : 0, 'short');
  }

  const percent = (part) => format({ style: 'percent', maximumFractionDigits: 0 }).format(part);

  function duration(seconds) {
    if (seconds < 1) return unit('second', seconds, 1, 'short');
    const whole = Math.round(seconds);
    const pad = (x) => String(x).padStart(2, '0');
    const h = Math.floor(whole / 3600), m = Math.floor(whole / 60) % 60, s = whole % 60;
    return h ? `${h}:${pad(m)}:${pad(s)}` : `${m}:${pad(s)}`;
  }

  function period(days) { // RETENTION_DAYS, which may be a fraction
    if (days < 1) return unit('hour', Math.max(1, Math.round(days * 24)));
    const rounded = Math.round(days * 10) / 10;
    return unit('day', rounded, Number.isInteger(rounded) ? 0 : 1);
  }

  function timeLeft(seconds) {
    if (seconds < 60) return unit('second', Math.max(5, Math.ceil(seconds / 5) * 5));
    if (seconds < 3600) return unit('minute', Math.ceil(seconds / 60));
    const minutes = Math.round((seconds % 3600) / 60);
    return unit('hour', Math.floor(seconds / 3600)) + (minutes ? ' ' + unit('minute', minutes) : '');
  }

  function when(iso) {
    const date = iso ? new Date(iso) : new Date();
    return isNaN(date) ? '' : format({ dateStyle: 'medium', timeStyle: 'short' }, 'date').format(date);
  }

  function sentence(text) { // a message of the service's, shown on its own
    const trimmed = text.trim();
    return trimmed.charAt(0).toUpperCase() + trimmed.slice(1) + (/[.!?]$/.test(trimmed) ? '' : '.');
  }

  function b64(text) { // Upload-Metadata values: base64 of UTF-8
    let binary = '';
    for (const byte of new TextEncoder().encode(String(text))) binary += String.fromCharCode(byte);
    return btoa(binary);
  }

  // HTTP ########################################################################

  /* One request over XHR (fetch has no upload progress). Resolves, never rejects: status 0 is a
     dropped connection, a timeout, a stall or an abort. `run` receives the XHR so that it can be aborted. */
  function http(method, path, { headers = {}, body = null, json, token, onProgress, onSent, run } = {}) {
    return new Promise((resolve) => {
      const xhr = new XMLHttpRequest();
      let stall = 0;
      let settled = false;
      const done = () => {
        if (settled) return;
        settled = true;
        clearTimeout(stall);
        if (run && run.xhr === xhr) run.xhr = null;
        const status = xhr.readyState === 4 ? xhr.status : 0;
        let data = null;
        try { data = status && xhr.responseText ? JSON.parse(xhr.responseText) : null; } catch { data = null; }
        resolve({ status, data, header: (name) => (status ? xhr.getResponseHeader(name) : null) });
      };
      xhr.open(method, path);
      const bearer = token === undefined ? auth && auth.access_token : token;
      if (bearer) xhr.setRequestHeader('Authorization', 'Bearer ' + bearer);
      xhr.setRequestHeader('Accept-Language', language); // the service's refusals in the page's language, whatever the browser's
      if (json !== undefined) {
        xhr.setRequestHeader('Content-Type', 'application/json');
        body = JSON.stringify(json);
      }
      for (const [name, value] of Object.entries(headers)) xhr.setRequestHeader(name, value);
      if (onProgress) {
        const arm = () => { clearTimeout(stall); stall = setTimeout(() => xhr.abort(), STALL); };
        xhr.upload.onprogress = (event) => { arm(); onProgress(event.loaded); };
        xhr.upload.onload = () => { clearTimeout(stall); if (onSent) onSent(); }; // now the service answers when it is done
        arm();
      } else {
        xhr.timeout = 60000;
      }
      xhr.onload = xhr.onerror = xhr.ontimeout = xhr.onabort = done;
      if (run) { run.xhr = xhr; run.abortable = method !== 'POST'; }
      xhr.send(body);
    });
  }

  const apiMessage = (res) => (res.data && typeof res.data.error === 'string' ? res.data.error : '');
  const reason = (res) => apiMessage(res) || t('error.status', { status: res.status });
  const retryable = (status) => status === 0 || status === 408 || status === 409 || status === 423 || status === 429 || status >= 500;

  // What a refused file looks like, from its first bytes.
  async function sniff(file) {
    let b;
    try { b = new Uint8Array(await file.slice(0, 16).arrayBuffer()); } catch { return ''; }
    const text = (at, n) => String.fromCharCode(...b.subarray(at, at + n));
    if (['RIFF', 'RIFX', 'RF64', 'BW64'].includes(text(0, 4)) && text(8, 4) === 'WAVE') return 'WAV';
    if (text(0, 3) === 'ID3') return 'MP3';
    if (b[0] === 0xff && (b[1] & 0xf6) === 0xf0) return 'AAC';
    if (b[0] === 0xff && (b[1] & 0xe0) === 0xe0) return 'MP3';
    if (text(0, 4) === 'fLaC') return 'FLAC';
    if (text(0, 4) === 'OggS') return 'Ogg';
    if (text(4, 4) === 'ftyp') return 'M4A/MP4';
    if (text(0, 4) === 'FORM' && /^AIF[FC]$/.test(text(8, 4))) return 'AIFF';
    if (text(0, 4) === 'RIFF' && text(8, 4) === 'AVI ') return 'AVI video';
    return '';
  }

  // Encoding options ############################################################

  function buildOptions() { // the choices' words in the language shown, the choice kept
    const fill = (select, values, label) => {
      const chosen = select.value;
      select.replaceChildren(...values.map((value, i) => new Option(label(value, i), String(value))));
      if (chosen) select.value = chosen;
    };
    fill($('bitrate'), BITRATES, (kbps) => t(BITRATE_NOTES[kbps] || 'settings.kbps', { kbps }));
    fill($('quality'), VBR_KBPS.map((_, i) => i), (quality) => t(VBR_NOTES[quality] || 'settings.vbrOption', { quality, kbps: VBR_KBPS[quality] }));
  }

  function currentOptions() {
    const options = $('mode-vbr').checked ? { vbr_quality: $('quality').value } : { bitrate: $('bitrate').value };
    const channels = document.querySelector('input[name="channels"]:checked').value;
    if (channels) options.channels = channels;
    return options;
  }

  function syncOptions(save) {
    $('bitrate').disabled = $('mode-vbr').checked;
    $('quality').disabled = !$('mode-vbr').checked;
    const options = currentOptions();
    say($('settings-summary'), () => (options.bitrate ? t('settings.summaryCbr', { kbps: Number(options.bitrate) }) : t('settings.summaryVbr', { quality: Number(options.vbr_quality) }))
      + ' · ' + t({ 1: 'settings.summaryMono', 2: 'settings.summaryStereo' }[options.channels] || 'settings.summaryKeep'));
    if (save) store.set(OPTIONS_KEY, { vbr: $('mode-vbr').checked, bitrate: $('bitrate').value, quality: $('quality').value, channels: options.channels || '' });
  }

  function restoreOptions() {
    const saved = store.get(OPTIONS_KEY);
    $('bitrate').value = '128';
    $('quality').value = '2';
    if (saved) {
      $(saved.vbr ? 'mode-vbr' : 'mode-cbr').checked = true;
      if (saved.bitrate) $('bitrate').value = saved.bitrate;
      if (saved.quality) $('quality').value = saved.quality;
      $({ 1: 'ch-mono', 2: 'ch-stereo' }[saved.channels] || 'ch-keep').checked = true;
    }
    syncOptions(false);
  }

  const fingerprint = (file, options) =>
    FP_KEY + JSON.stringify([auth.user_id, file.name, file.size, file.lastModified, Object.entries(options).map((e) => e.join('=')).join('&')]);

  function storedUploads(test) { // [key, {url, name}] of this user's fingerprints that pass test
    const found = [];
    for (const key of store.keys()) {
      if (!key.startsWith(FP_KEY)) continue;
      let parts;
      try { parts = JSON.parse(key.slice(FP_KEY.length)); } catch { continue; }
      if (auth && parts[0] === auth.user_id && test(parts)) found.push([key, store.get(key) || {}]);
    }
    return found;
  }

  // One file's upload: the tus client ###########################################

  class Upload {
    constructor(file, options, resumeUrl = null) {
      this.file = file;
      this.options = options;
      this.fp = fingerprint(file, options);
      this.url = null; // the upload's URL (Location, absolute: used as given); with one, HEAD, then go on from its offset
      this.offset = 0; // what the service has stored
      this.run = null; // the loop in progress: {stopped, xhr, wake, tries}
      this.state = '';
      this.samples = [];
      if (resumeUrl) { // an unfinished upload the service listed
        this.url = resumeUrl;
        store.set(this.fp, { url: resumeUrl, name: file.name });
      } else { // one this browser kept for this file
        const saved = store.get(this.fp);
        if (saved && saved.url) this.url = saved.url;
      }
      const li = clone('upload-row');
      this.li = li;
      this.el = {};
      for (const name of ['name', 'size', 'figures', 'status', 'detail', 'pause', 'resume', 'restart', 'retry', 'cancel']) {
        this.el[name] = li.querySelector('.' + name);
      }
      this.el.progress = li.querySelector('progress');
      this.el.name.textContent = file.name;
      say(this.el.size, () => bytes(file.size));
      this.el.progress.max = Math.max(file.size, 1);
      say(this.el.progress, T('upload.progressOf', { name: file.name }), 'aria-label');
      for (const action of ['pause', 'resume', 'cancel', 'retry', 'restart']) {
        say(this.el[action], T(`upload.${action}File`, { name: file.name }), 'aria-label');
        this.el[action].addEventListener('click', () => this[action]());
      }
      this.progress(0);
    }

    get size() { return this.file.size; }

    show(state, status, detail = '') {
      this.state = state;
      this.li.dataset.state = state;
      say(this.el.status, status);
      say(this.el.detail, detail);
      const focused = this.li.contains(document.activeElement) && document.activeElement.matches('button') ? document.activeElement : null;
      const active = ['queued', 'uploading', 'waiting'].includes(state);
      this.el.pause.hidden = !active;
      this.el.resume.hidden = state !== 'paused';
      this.el.cancel.hidden = !(active || state === 'paused');
      this.el.retry.hidden = !(state === 'failed' && this.canRetry);
      this.el.restart.hidden = !(state === 'failed' && this.stale && this.stale.length);
      this.el.progress.hidden = this.el.figures.hidden = !LIVE.includes(state);
      this.draw();
      if (focused && focused.closest('[hidden]')) { // keep the keyboard where it was
        const next = [...this.li.querySelectorAll('.actions button')].find((b) => !b.hidden);
        (next || this.li.querySelector('.status-box')).focus();
      }
      updateChrome();
    }

    progress(n) {
      const now = performance.now();
      if (n < (this.samples.length ? this.samples[this.samples.length - 1][1] : 0)) this.samples = [];
      this.samples.push([now, n]);
      while (this.samples.length > 2 && now - this.samples[0][0] > 4000) this.samples.shift();
      this.el.progress.value = n;
      if (n >= this.size || now - (this.drawn || 0) >= 250) this.draw();
    }

    draw() { // bytes sent, and the speed over the last seconds while they move
      const now = (this.drawn = performance.now());
      const sent = this.el.progress.value;
      const size = this.size;
      const [t0, n0] = this.samples.length ? this.samples[0] : [now, sent];
      const rate = this.state === 'uploading' && now - t0 > 700 && sent > n0 && sent < size ? (sent - n0) / ((now - t0) / 1000) : 0;
      say(this.el.figures, () => t(rate ? 'upload.speed' : 'upload.figures', { sent: bytes(sent), size: bytes(size), rate: bytes(rate) }));
      drawBatch();
    }

    metadata() {
      return [['filename', this.file.name], ...Object.entries(this.options)].map(([key, value]) => key + ' ' + b64(value)).join(',');
    }

    start() {
      const run = (this.run = { stopped: false, xhr: null, wake: null, tries: 0, abortable: true });
      this.drive(run)
        .catch((error) => { if (!run.stopped) this.fail(T('upload.pageError'), String(error && error.message)); })
        .finally(() => { if (this.run === run) this.run = null; pump(); });
    }

    stop() { // leaves the upload on the service as it stands
      const run = this.run;
      this.run = null;
      if (!run) return;
      run.stopped = true;
      if (run.xhr && run.abortable) run.xhr.abort();
      if (run.wake) run.wake();
    }

    async request(run, method, target, options = {}) {
      const res = await http(method, target, { ...options, run });
      if (res.status === 401 || res.status === 403) expire();
      return res;
    }

    /* The tus loop: HEAD (on a resume and after any failure) for the service's offset, POST to create,
       PATCH chunk after chunk, GET the record. Dropped connections, 5xx, 408, 409 and 423 are retried
       with back-off, each retry asking HEAD for the offset first. */
    async drive(run) {
      const token = auth.access_token;
      let head = Boolean(this.url);
      this.show('uploading', T(head ? 'upload.resuming' : 'upload.starting'));
      while (!run.stopped) {
        let res;
        if (head && this.url) {
          res = await this.request(run, 'HEAD', this.url, { headers: TUS });
          if (run.stopped) return;
          if (res.status === 200) {
            this.offset = Number(res.header('Upload-Offset')) || 0;
            this.progress(this.offset);
            head = false;
          } else if (res.status === 404 || res.status === 410) { // gone (expired, ended): start afresh
            store.del(this.fp);
            unlist(this.url);
            this.url = null;
            this.offset = 0;
            head = false;
          } else if (retryable(res.status)) {
            await this.wait(run, res);
          } else {
            return this.refused(res, 'head');
          }
          continue;
        }
        if (!this.url) {
          const headers = { ...TUS, 'Upload-Length': String(this.size), 'Upload-Metadata': this.metadata() };
          res = await this.request(run, 'POST', url(`users/${enc(auth.user_id)}/uploads`), { headers });
          if (res.status === 201 && res.header('Location')) {
            this.url = res.header('Location');
            this.offset = 0;
            run.tries = 0;
            if (run.stopped && this.state !== 'paused') { // cancelled, or signed out, meanwhile
              terminate(this.url, token);
              this.url = null;
              return;
            }
            store.set(this.fp, { url: this.url, name: this.file.name });
            continue;
          }
          if (run.stopped) return;
          if (retryable(res.status) && res.status !== 409) { await this.wait(run, res); continue; }
          return this.refused(res, 'create');
        }
        if (this.offset < this.size) {
          const start = this.offset;
          if (!(await this.readable(start))) return this.fail(T('upload.unreadable'), T('upload.unreadableHint'));
          if (run.stopped) return;
          const end = Math.min(this.size, start + CHUNK);
          this.samples = [[performance.now(), start]]; // the speed of this request's bytes
          this.show('uploading', T('upload.uploading'));
          res = await this.request(run, 'PATCH', this.url, {
            headers: { ...TUS, 'Upload-Offset': String(start), 'Content-Type': 'application/offset+octet-stream' },
            body: this.file.slice(start, end),
            onProgress: (n) => this.progress(start + n),
            onSent: end === this.size ? () => { if (!run.stopped) this.show('converting', T('upload.converting')); } : null,
          });
          if (run.stopped) return;
          if (res.status === 204) {
            const offset = Number(res.header('Upload-Offset'));
            if (Number.isFinite(offset) && offset >= start) this.offset = offset;
            else head = true;
            run.tries = 0;
            continue;
          }
          if (res.status === 404 || retryable(res.status)) { head = true; await this.wait(run, res); continue; }
          return this.refused(res, 'patch');
        }
        this.show('converting', T('upload.converting')); // every byte is in: the record, once stored
        res = await this.request(run, 'GET', this.url);
        if (run.stopped) return;
        if (res.status === 200 && res.data && res.data.url) return this.finish(res.data);
        if (retryable(res.status)) { head = true; await this.wait(run, res); continue; }
        if (res.status === 404 && !run.again) { // resumed an upload whose record has since been deleted: upload anew
          run.again = true;
          store.del(this.fp);
          this.url = null;
          this.offset = 0;
          continue;
        }
        return this.refused(res, 'get');
      }
    }

    async readable(at) {
      try {
        await this.file.slice(at, at + 1).arrayBuffer();
        return true;
      } catch {
        return false;
      }
    }

    wait(run, res) {
      let ms = run.tries < BACKOFF.length ? BACKOFF[run.tries] : STEADY;
      run.tries++;
      const after = Number(res.header('Retry-After'));
      if (after > 0) ms = Math.max(ms, Math.min(after, 60) * 1000);
      const seconds = Math.max(1, Math.round(ms / 1000));
      if (!navigator.onLine) this.show('waiting', T('upload.offline'));
      else if (res.status === 0) this.show('waiting', T('upload.dropped', { seconds }));
      else if (res.status >= 500 || res.status === 408 || res.status === 429) this.show('waiting', T('upload.busy', { seconds }));
      else if (res.status === 423) this.show('converting', T('upload.converting')); // every byte is in; the record is being stored
      // 409: the service is catching up; the status stays as it is
      this.samples = [];
      return new Promise((resolve) => {
        const timer = setTimeout(resolve, ms);
        run.wake = () => { clearTimeout(timer); resolve(); };
      }).then(() => { run.wake = null; });
    }

    async refused(res, step) {
      const status = res.status;
      const api = apiMessage(res);
      if (step !== 'create') { // the service has ended this upload
        store.del(this.fp);
        unlist(this.url);
      }
      this.url = null;
      this.canRetry = false;
      this.stale = null;
      if (status === 415) {
        const kind = await sniff(this.file);
        if (kind === 'WAV') return this.fail(T('upload.badEncoding'), api ? T('upload.badEncodingWhy', { reason: api }) : T('upload.badEncodingHint'));
        return this.fail(kind ? T('upload.notWavKind', { kind }) : T('upload.notWav'), T('upload.notWavHint'));
      }
      // A name taken: 409 at first, 422 since tus clients retry a 409 (as an offset conflict) and lose the message.
      if (step === 'create' && (status === 409 || status === 422)) {
        await loadUnfinished();
        const held = serverUploads.filter((u) => u.filename === this.file.name);
        if (held.length) { // another upload of this name, begun here, in another tab or on another device
          const here = uploads.some((other) => other !== this && LIVE.includes(other.state) && held.some((u) => sameUrl(u.url, other.url)));
          this.stale = here ? null : held.map((u) => u.url);
          this.canRetry = here;
          return this.fail(T('upload.held'), T(here ? 'upload.heldLive' : 'upload.heldStale'));
        }
        if (status === 409 || RECORD_HOLDS_NAME.test(api)) {
          this.canRetry = true;
          reloadRecords(); // it may come from elsewhere: show it below
          return this.fail(T('upload.converted'), T('upload.convertedHint'));
        }
      }
      if (status === 422) return this.fail(T(step === 'create' ? 'upload.cannot' : 'upload.damaged'), api);
      if (status === 413 && service && this.size > service.max_upload_bytes) {
        return this.fail(T('upload.tooLarge'), () => t('upload.limit', { size: bytes(service.max_upload_bytes) }));
      }
      if (status === 413) { // USER_QUOTA_MB: the service's words name the usage and the quota
        this.canRetry = true; // it may fit once MP3s are deleted
        loadUsage();
        return this.fail(T('upload.noRoom'), api);
      }
      if (status === 404 && step === 'get') return this.fail(T('upload.deletedBefore'));
      return this.fail(T('upload.failed', { reason: t('error.status', { status }) }), api);
    }

    fail(status, detail = '') {
      this.show('failed', status, detail);
    }

    finish(record) { // the row gives way to the MP3's in "Your MP3s"
      store.del(this.fp);
      this.record = record;
      unlist(this.url);
      this.url = null;
      this.progress(this.size);
      const focused = this.li.contains(document.activeElement);
      this.show('done', '');
      this.li.remove();
      if (uploads.includes(this)) uploads.splice(uploads.indexOf(this), 1);
      const li = addRecord(record, true);
      if (li) {
        li.classList.add('fresh');
        say($('records-status'), T('records.ready', { name: record.filename }));
        if (focused) li.querySelector('.download').focus();
      }
      updateChrome();
      loadUsage();
    }

    pause() {
      this.stop();
      this.show('paused', T('upload.paused', { percent: percent(this.el.progress.value / this.size) }));
      pump();
    }

    resume() {
      this.show('queued', T('upload.queued'));
      pump();
    }

    cancel() {
      this.stop();
      store.del(this.fp);
      this.show('cancelled', T('upload.cancelled'));
      if (this.url) this.terminate().then(loadUsage); // its bytes so far no longer count
      pump();
    }

    retry() {
      this.url = null;
      this.offset = 0;
      this.progress(0);
      this.resume();
    }

    async restart() { // "Start over": end the earlier uploads that hold this name, then upload again
      const stale = this.stale || [];
      this.stale = null;
      this.show('uploading', T('upload.startingOver'));
      for (const other of uploads) { // rows of the dropped uploads on this page
        if (other !== this && stale.some((target) => sameUrl(target, other.url)) && LIVE.includes(other.state)) {
          other.stop();
          other.url = null;
          other.show('cancelled', T('upload.startedOver'));
        }
      }
      for (const [key, saved] of storedUploads(() => true)) if (stale.some((target) => sameUrl(target, saved.url))) store.del(key);
      await Promise.all(stale.map((target) => terminate(target)));
      for (const target of stale) unlist(target);
      this.retry();
    }

    terminate() { // tus termination (DELETE): the service drops the bytes and frees the name
      const target = this.url;
      this.url = null;
      store.del(this.fp);
      unlist(target);
      return terminate(target);
    }
  }

  async function terminate(target, token = auth && auth.access_token) {
    for (let attempt = 0; attempt < 6; attempt++) {
      const res = await http('DELETE', target, { headers: TUS, token });
      if (!retryable(res.status) || res.status === 409) return res;
      await new Promise((resolve) => setTimeout(resolve, BACKOFF[Math.min(attempt, BACKOFF.length - 1)]));
    }
    return { status: 0 };
  }

  function pump() { // start queued uploads while fewer than PARALLEL run
    let busy = uploads.filter((u) => u.run).length;
    for (const upload of uploads) {
      if (busy >= PARALLEL) break;
      if (upload.state === 'queued' && !upload.run) {
        busy++;
        upload.start();
      }
    }
  }

  /* Files chosen or dropped. A file goes on with an unfinished upload of its own when there is one: the one
     this browser kept for it (same name, size, date and settings), else one the service lists with its name
     and size (begun on another device, or before this browser forgot it), with that upload's settings. */
  function addFiles(files, chosenFor = null) {
    if (!auth) return;
    const top = $('uploads').firstElementChild; // the newest files go first, in the order chosen
    let first = null;
    for (const file of files) {
      let options = currentOptions();
      const saved = store.get(fingerprint(file, options));
      let listed = chosenFor;
      if (!listed && !(saved && saved.url)) listed = serverUploads.find((u) => u.filename === file.name && u.length === file.size);
      if (listed) options = listed.options || {};
      const fp = fingerprint(file, options);
      if (uploads.some((u) => u.fp === fp && LIVE.includes(u.state))) continue; // already on its way
      const upload = new Upload(file, options, listed ? listed.url : null);
      uploads.push(upload);
      if (!batch.some((u) => LIVE.includes(u.state))) { batch = []; batchSamples = []; }
      batch.push(upload);
      $('uploads').insertBefore(upload.li, top);
      first = first || upload.li;
      if (!file.size) upload.fail(T('upload.empty'), T('upload.emptyHint'));
      else upload.show('queued', T('upload.queued'));
    }
    pump();
    if (first) first.scrollIntoView({ block: 'nearest' });
  }

  function updateChrome() {
    $('uploads-head').hidden = !$('uploads').children.length;
    $('clear-finished').hidden = !uploads.some((u) => !LIVE.includes(u.state));
    $('resume-hint').hidden = !uploads.some((u) => LIVE.includes(u.state) && u.state !== 'converting');
    drawUnfinished();
    drawBatch();
  }

  function drawBatch() { // several files at once: how many are done, the bytes, and the time left at the recent speed
    const counted = batch.filter((u) => u.state !== 'cancelled' && u.state !== 'failed');
    $('batch').hidden = counted.length < 2 || !counted.some((u) => LIVE.includes(u.state));
    if ($('batch').hidden) return;
    const size = counted.reduce((sum, u) => sum + u.size, 0);
    const sent = counted.reduce((sum, u) => sum + (u.state === 'done' ? u.size : u.el.progress.value), 0);
    const done = counted.filter((u) => u.state === 'done').length;
    const now = performance.now();
    batchSamples.push([now, sent]);
    while (batchSamples.length > 2 && now - batchSamples[0][0] > 10000) batchSamples.shift();
    const [t0, n0] = batchSamples[0];
    const moving = counted.some((u) => LIVE.includes(u.state) && u.state !== 'paused');
    const left = moving && now - t0 > 2000 && sent > n0 ? (size - sent) / ((sent - n0) / ((now - t0) / 1000)) : 0;
    $('batch-progress').max = Math.max(size, 1);
    $('batch-progress').value = sent;
    say($('batch-figures'), () => [t('batch.files', { done, count: counted.length }), t('batch.bytes', { sent: bytes(sent), size: bytes(size) }),
      left ? t('batch.left', { time: timeLeft(left) }) : ''].filter(Boolean).join(' · '));
  }

  function clearFinished() {
    for (const upload of uploads.filter((u) => !LIVE.includes(u.state))) {
      upload.li.remove();
      uploads.splice(uploads.indexOf(upload), 1);
    }
    updateChrome();
    $('upload-title').focus();
  }

  // Unfinished uploads, as the service lists them #################################

  async function loadUnfinished() {
    if (!auth) return;
    const asked = ++unfinishedAsked;
    const res = await http('GET', url(`users/${enc(auth.user_id)}/uploads`));
    if (asked !== unfinishedAsked || !auth) return;
    if (res.status === 401 || res.status === 403) return expire();
    if (res.status !== 200 || !res.data || !Array.isArray(res.data.uploads)) return; // without the list, a file chosen again still goes on from this browser's
    serverUploads = res.data.uploads.filter((u) => typeof u.filename === 'string'); // not the pieces of a parallel upload: its final upload has the name
    drawUnfinished();
  }

  function unlist(target) { // an upload finished, terminated or ended: no longer to go on with
    serverUploads = serverUploads.filter((u) => !sameUrl(u.url, target));
  }

  function drawUnfinished() { // those no row of this page drives, newest first; rows kept, so that focus stays
    const listed = serverUploads.filter((u) => !uploads.some((upload) => sameUrl(upload.url, u.url)));
    for (const [target, li] of unfinishedRows) {
      if (!listed.some((u) => u.url === target)) {
        li.remove();
        unfinishedRows.delete(target);
      }
    }
    for (const entry of listed) {
      const li = unfinishedRows.get(entry.url) || unfinishedRow(entry);
      unfinishedRows.set(entry.url, li);
      $('unfinished').append(li);
    }
    $('unfinished-section').hidden = !listed.length;
  }

  function unfinishedRow(entry) {
    const li = clone('unfinished-row');
    const known = typeof entry.length === 'number';
    const input = li.querySelector('input');
    const choose = li.querySelector('.choose');
    const remove = li.querySelector('.delete');
    const error = li.querySelector('.error');
    const name = li.querySelector('.name');
    name.id = 'unfinished-' + entry.upload_id;
    name.textContent = entry.filename;
    input.id = name.id + '-file';
    choose.htmlFor = input.id;
    input.setAttribute('aria-describedby', name.id);
    say(li.querySelector('.size'), () => (known ? bytes(entry.length) : t('unfinished.unknownSize')));
    const bar = li.querySelector('progress');
    bar.max = Math.max(entry.length || 0, 1);
    bar.value = known ? entry.offset : 0;
    bar.hidden = !known;
    say(bar, T('upload.progressOf', { name: entry.filename }), 'aria-label');
    say(li.querySelector('.figures'), () => (known
      ? t('unfinished.progress', { sent: bytes(entry.offset), size: bytes(entry.length), percent: percent(entry.offset / Math.max(entry.length, 1)), date: when(entry.expires) })
      : t('unfinished.deferred', { sent: bytes(entry.offset), date: when(entry.expires) })));
    input.hidden = choose.hidden = !known; // a recording of unknown length: the app recording it finishes it
    say(remove, T('unfinished.deleteFile', { name: entry.filename }), 'aria-label');
    input.addEventListener('change', () => {
      const file = input.files[0];
      input.value = '';
      if (!file) return;
      if (file.name !== entry.filename || file.size !== entry.length) {
        say(error, () => t('unfinished.notSame', { name: entry.filename, size: bytes(entry.length) }));
        return;
      }
      say(error, '');
      addFiles([file], entry);
      $('upload-title').scrollIntoView({ block: 'nearest' });
    });
    remove.addEventListener('click', () => deleteUnfinished(entry, li, remove, error));
    return li;
  }

  async function deleteUnfinished(entry, li, button, error) {
    if (!confirm(t('unfinished.confirm', { name: entry.filename }))) return;
    say(error, '');
    button.disabled = true;
    const res = await terminate(entry.url);
    button.disabled = false;
    if (res.status === 401 || res.status === 403) return expire();
    if (res.status !== 204 && res.status !== 404) {
      say(error, res.status ? () => t('unfinished.deleteFailed', { reason: reason(res) }) : T('unreachable'));
      return;
    }
    for (const [key, saved] of storedUploads(() => true)) if (sameUrl(saved.url, entry.url)) store.del(key);
    const next = li.nextElementSibling || li.previousElementSibling;
    const hadFocus = li.contains(document.activeElement);
    unlist(entry.url);
    drawUnfinished();
    loadUsage();
    if (hadFocus) (next ? next.querySelector('.delete') : $('upload-title')).focus();
  }

  // Records #####################################################################

  function addRecord(record, first) {
    if (shown.has(record.record_id)) return null;
    const li = clone('record-row');
    const name = record.filename;
    const box = li.querySelector('.select');
    box.id = 'pick-' + record.record_id;
    box.checked = selected.has(record.record_id);
    box.addEventListener('change', () => {
      if (box.checked) selected.add(record.record_id);
      else selected.delete(record.record_id);
      drawTools();
    });
    const label = li.querySelector('.name');
    label.htmlFor = box.id;
    label.textContent = record.title ? `${name} — ${record.title}` : name;
    say(li.querySelector('.info'), () => `${duration(record.duration_seconds)} · ${bytes(record.size_bytes)} · ${when(record.created_at)}`);
    const audio = li.querySelector('audio');
    audio.src = record.url;
    say(audio, T('records.play', { name }), 'aria-label');
    const link = li.querySelector('.download');
    link.href = record.url;
    say(link, T('records.downloadFile', { name }), 'aria-label');
    const share = li.querySelector('.copy-link');
    say(share, T('records.copyLinkFile', { name }), 'aria-label');
    share.addEventListener('click', () => copyLink(record, li, share));
    const button = li.querySelector('.delete');
    say(button, T('records.deleteFile', { name }), 'aria-label');
    button.addEventListener('click', () => deleteRecord(record, li, button));
    shown.set(record.record_id, li);
    if (first) $('records').prepend(li);
    else $('records').append(li);
    recordsStatus();
    drawTools();
    return li;
  }

  // A record's link is a capability: whoever has it can download the MP3, until the MP3 is deleted.
  async function copyLink(record, li, button) {
    const panel = li.querySelector('.share');
    const field = panel.querySelector('.link');
    const note = panel.querySelector('.share-note');
    note.id = 'note-' + record.record_id;
    panel.id = 'share-' + record.record_id;
    button.setAttribute('aria-controls', panel.id);
    button.setAttribute('aria-expanded', 'true');
    field.value = record.url;
    field.setAttribute('aria-describedby', note.id);
    say(field, T('records.linkTo', { name: record.filename }), 'aria-label');
    panel.hidden = false;
    let copied = false;
    try {
      await navigator.clipboard.writeText(record.url);
      copied = true;
    } catch { // no clipboard access: the link selected, for the person to copy
      field.focus();
      field.select();
      try { copied = document.execCommand('copy'); } catch { copied = false; }
    }
    say(panel.querySelector('.copied'), T(copied ? 'records.linkCopied' : 'records.linkByHand'));
  }

  function drawTools() { // "Select all" and the ZIP's button, for what is chosen
    for (const id of selected) if (!shown.has(id)) selected.delete(id);
    $('records-tools').hidden = !shown.size;
    $('select-all').checked = shown.size > 0 && selected.size === shown.size;
    $('select-all').indeterminate = selected.size > 0 && selected.size < shown.size;
    const count = selected.size;
    say($('zip'), count ? T('zip.selected', { count }) : T('zip.all'));
  }

  function selectAll() {
    const on = $('select-all').checked;
    for (const [id, li] of shown) {
      li.querySelector('.select').checked = on;
      if (on) selected.add(id);
      else selected.delete(id);
    }
    drawTools();
  }

  /* One ZIP of the chosen MP3s (or of all): the service signs a short-lived link for them (a browser's
     download cannot carry the Bearer header), and the browser downloads it as any file. */
  async function downloadZip() {
    const ids = [...selected];
    const status = $('zip-status');
    if (ids.length > ZIP_MAX) return say(status, T('zip.tooMany', { count: ZIP_MAX }));
    $('zip').disabled = true;
    say(status, T('zip.preparing'));
    const res = await http('POST', url(`users/${enc(auth.user_id)}/records.zip`), ids.length ? { json: { records: ids } } : {});
    $('zip').disabled = false;
    if (res.status === 401 || res.status === 403) return expire();
    if (res.status !== 201 || !res.data || !res.data.url) {
      return say(status, res.status ? () => t('zip.failed', { reason: reason(res) }) : T('unreachable'));
    }
    const link = document.createElement('a');
    link.href = res.data.url;
    link.download = ''; // the service's Content-Disposition names it
    link.hidden = true;
    document.body.append(link);
    link.click();
    link.remove();
    say(status, ids.length ? T('zip.started', { count: ids.length }) : T('zip.startedAll'));
  }

  function recordsStatus(message) {
    say($('records-status'), message !== undefined ? message : shown.size ? '' : T('records.none'));
  }

  async function loadRecords() {
    if (!auth) return;
    const more = $('more');
    const current = listing;
    more.disabled = true;
    if (!shown.size) recordsStatus(T('records.loading'));
    const res = await http('GET', url(`users/${enc(auth.user_id)}/records?limit=${PAGE}` + (cursor ? '&cursor=' + enc(cursor) : '')));
    if (current !== listing) return;
    more.disabled = false;
    if (res.status === 401 || res.status === 403) return expire();
    recordsFailed = !(res.status === 200 && res.data && Array.isArray(res.data.records));
    if (recordsFailed) return recordsStatus(res.status ? () => t('records.loadFailed', { reason: reason(res) }) : T('records.unreachable'));
    for (const record of res.data.records) addRecord(record, false);
    cursor = res.data.next_cursor || null;
    more.hidden = !cursor;
    recordsStatus();
  }

  function reloadRecords() {
    listing++;
    $('records').replaceChildren();
    shown.clear();
    cursor = null;
    drawTools();
    loadRecords();
  }

  async function deleteRecord(record, li, button) {
    if (!confirm(t('records.confirmDelete', { name: record.filename }))) return;
    const error = li.querySelector('.error');
    say(error, '');
    button.disabled = true;
    const res = await http('DELETE', url(`record?id=${enc(record.record_id)}&user=${enc(record.user_id || auth.user_id)}`));
    button.disabled = false;
    if (res.status === 401 || res.status === 403) return expire();
    if (res.status !== 204 && res.status !== 404) {
      say(error, res.status ? () => t('records.deleteFailed', { reason: reason(res) }) : T('unreachable'));
      return;
    }
    const next = li.nextElementSibling || li.previousElementSibling;
    const hadFocus = li.contains(document.activeElement);
    li.remove();
    shown.delete(record.record_id);
    drawTools();
    recordsStatus(T(shown.size ? 'records.deleted' : 'records.deletedLast', { name: record.filename }));
    loadUsage();
    if (hadFocus) (next ? next.querySelector('.delete') : $('records-title')).focus();
  }

  // The service and the user ###################################################

  async function loadService() {
    const res = await http('GET', url('service'), { token: '' });
    if (res.status === 200 && res.data && typeof res.data.signup === 'string') service = res.data;
    showService();
  }

  function showService() { // sign-up as the operator set it (open while unknown: POST /users would say otherwise)
    const signup = service ? service.signup : 'open';
    $('create-form').hidden = signup === 'closed';
    $('signup-closed').hidden = signup !== 'closed';
    $('invite-field').hidden = signup !== 'invite';
    const days = service && service.retention_days;
    say($('retention'), days ? () => t('records.retention', { period: period(days) }) : '');
    $('retention').hidden = !days;
  }

  async function loadUsage() { // the header's name and "used X of Y"
    if (!auth) return;
    const asked = ++usageAsked;
    const res = await http('GET', url(`users/${enc(auth.user_id)}`));
    if (asked !== usageAsked || !auth) return;
    if (res.status === 401 || res.status === 403) return expire();
    if (res.status === 200 && res.data) showUsage(res.data);
    else if (!auth.name) showWho(auth.user_id); // the name cannot be had now: the ID says who at least
  }

  function showUsage(answer) {
    usage = answer;
    if (usage.name && usage.name !== auth.name) {
      auth.name = usage.name;
      store.set(AUTH_KEY, auth); // shown at once on the next visit
    }
    showWho(auth.name || auth.user_id);
    const used = usage.bytes_stored;
    const quota = typeof usage.quota_bytes === 'number' ? usage.quota_bytes : null;
    say($('usage'), () => (quota === null ? t('account.used', { used: bytes(used) }) : t('account.usedOf', { used: bytes(used), quota: bytes(quota) })));
    $('usage').classList.toggle('full', quota !== null && used >= quota);
    $('usage').hidden = false;
  }

  function showWho(name) {
    $('who-name').textContent = name;
    $('who').hidden = false;
  }

  // Signing in and out ##########################################################

  function resetLists() {
    for (const upload of uploads) upload.stop();
    uploads.length = 0;
    batch = [];
    $('uploads').replaceChildren();
    serverUploads = [];
    unfinishedAsked++;
    listing++;
    $('records').replaceChildren();
    shown.clear();
    selected.clear();
    cursor = null;
    $('more').hidden = true;
    say($('zip-status'), '');
    recordsStatus('');
    drawTools();
    updateChrome();
  }

  function notice(message) {
    say($('notice'), message);
    $('notice').hidden = !message;
  }

  function signIn(credentials, fresh, answer) {
    auth = { user_id: credentials.user_id, access_token: credentials.access_token, name: credentials.name || '' };
    store.set(AUTH_KEY, auth);
    resetLists();
    notice('');
    document.body.classList.add('wide'); // two columns on a wide screen: files, and the MP3s
    $('who').hidden = $('usage').hidden = true;
    if (auth.name) showWho(auth.name); // else once GET /users/{id} answers
    $('account').hidden = $('signed-in').hidden = false;
    $('signed-out').hidden = true;
    $('credentials').hidden = !fresh;
    if (fresh) {
      $('new-id').textContent = auth.user_id;
      $('new-token').textContent = auth.access_token;
      $('credentials-title').focus();
    }
    if (answer) {
      usageAsked++;
      showUsage(answer);
    } else {
      loadUsage();
    }
    loadUnfinished();
    loadRecords();
  }

  function showSignedOut(message) {
    auth = null;
    usage = null;
    resetLists();
    document.body.classList.remove('wide');
    $('account').hidden = $('signed-in').hidden = $('credentials').hidden = true;
    $('new-id').textContent = $('new-token').textContent = '';
    $('signed-out').hidden = false;
    notice(message);
  }

  function expire() { // the service refused the credentials (401/403): sign out, keep resume fingerprints
    if (!auth) return;
    const id = auth.user_id;
    store.del(AUTH_KEY);
    showSignedOut(T('notice.expired'));
    $('sign-in-id').value = id;
    $('sign-in-token').focus();
  }

  function signOut() {
    const unfinished = uploads.filter((u) => LIVE.includes(u.state));
    const kept = storedUploads(() => true); // resumable uploads of this user, from this page or an earlier one
    const count = unfinished.length + kept.filter(([key]) => !unfinished.some((u) => u.fp === key)).length;
    if (count && !confirm(t('signOut.confirm', { count }))) return;
    const token = auth.access_token;
    const urls = new Set(kept.map(([, saved]) => saved.url));
    for (const upload of unfinished) {
      upload.stop();
      urls.add(upload.url);
    }
    for (const target of urls) if (target) terminate(target, token); // frees their names on the service
    for (const [key] of kept) store.del(key); // forget what this page kept for this user
    store.del(AUTH_KEY);
    showSignedOut(T('notice.signedOut'));
    $('create-name').focus();
  }

  async function createUser(event) {
    event.preventDefault();
    const name = $('create-name').value.trim();
    const invite = $('invite-field').hidden ? null : $('create-invite').value.trim();
    const error = $('create-error');
    const button = event.target.querySelector('button');
    if (!name) { say(error, T('create.enterName')); $('create-name').focus(); return; }
    if (invite === '') { say(error, T('create.enterInvite')); $('create-invite').focus(); return; }
    say(error, '');
    button.disabled = true;
    const res = await http('POST', url('users'), { json: invite === null ? { name } : { name, invite }, token: '' });
    button.disabled = false;
    if (res.status === 201 && res.data && res.data.access_token) {
      event.target.reset();
      return signIn({ ...res.data, name }, true);
    }
    const api = apiMessage(res);
    if (res.status === 200 && res.data && res.data.error_name) say(error, T('create.taken'));
    else if (res.status === 422) say(error, api ? T('create.cannotUse', { reason: api }) : T('create.cannotUsePlain'));
    else if (res.status === 403) { // sign-up is by invite or closed: the service says what is needed
      say(error, api ? sentence(api) : () => sentence(t('create.closed')));
      await loadService(); // perhaps the operator changed it since the page was loaded
      if (!$('invite-field').hidden) { $('create-invite').focus(); return; }
    }
    else if (!res.status) say(error, T('unreachable'));
    else say(error, T('create.failed', { reason: reason(res) }));
    $('create-name').focus();
  }

  async function signInForm(event) {
    event.preventDefault();
    const id = $('sign-in-id').value.trim();
    const token = $('sign-in-token').value.trim();
    const error = $('sign-in-error');
    const button = event.target.querySelector('button');
    if (!id || !token) {
      say(error, T('signIn.enterBoth'));
      $(id ? 'sign-in-token' : 'sign-in-id').focus();
      return;
    }
    say(error, '');
    button.disabled = true;
    const res = await http('GET', url(`users/${enc(id)}`), { token }); // the credentials checked, and the name and usage
    button.disabled = false;
    if (res.status === 200 && res.data) {
      event.target.reset();
      signIn({ user_id: id, access_token: token, name: res.data.name }, false, res.data);
      $('upload-title').focus();
      return;
    }
    if ([401, 403, 404, 422].includes(res.status)) say(error, T('signIn.wrong'));
    else if (!res.status) say(error, T('unreachable'));
    else say(error, T('signIn.failed', { reason: reason(res) }));
  }

  async function copy(button) {
    const source = $(button.dataset.copy);
    let copied = false;
    try {
      await navigator.clipboard.writeText(source.textContent);
      copied = true;
    } catch {
      getSelection().selectAllChildren(source); // no clipboard access: select it for the person to copy
      try { copied = document.execCommand('copy'); } catch { copied = false; }
    }
    say(button, T(copied ? 'copied' : 'copyByHand'));
    setTimeout(() => say(button, T('copy')), 2500);
  }

  // Wiring ######################################################################

  function wire() {
    $('create-form').addEventListener('submit', createUser);
    $('sign-in-form').addEventListener('submit', signInForm);
    $('sign-out').addEventListener('click', signOut);
    $('language').addEventListener('click', () => {
      const other = language === 'en' ? 'ru' : 'en';
      store.set(LANGUAGE_KEY, other);
      useLanguage(other);
    });
    $('credentials-done').addEventListener('click', () => {
      $('credentials').hidden = true;
      $('new-id').textContent = $('new-token').textContent = '';
      $('upload-title').focus();
    });
    for (const button of document.querySelectorAll('[data-copy]')) button.addEventListener('click', () => copy(button));
    $('files').addEventListener('change', (event) => {
      addFiles([...event.target.files]);
      event.target.value = ''; // choosing the same file again is a change too
    });
    $('more').addEventListener('click', loadRecords);
    $('clear-finished').addEventListener('click', clearFinished);
    $('select-all').addEventListener('change', selectAll);
    $('zip').addEventListener('click', downloadZip);
    for (const input of document.querySelectorAll('.options input, .options select')) input.addEventListener('change', () => syncOptions(true));

    // Files dropped anywhere on the page.
    let depth = 0;
    const carriesFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes('Files');
    const dragging = (on) => document.body.classList.toggle('dragging', on && Boolean(auth));
    document.addEventListener('dragenter', (event) => { if (carriesFiles(event)) { event.preventDefault(); depth++; dragging(true); } });
    document.addEventListener('dragover', (event) => {
      if (!carriesFiles(event)) return;
      event.preventDefault();
      event.dataTransfer.dropEffect = auth ? 'copy' : 'none';
    });
    document.addEventListener('dragleave', (event) => { if (carriesFiles(event) && --depth <= 0) { depth = 0; dragging(false); } });
    document.addEventListener('drop', (event) => {
      if (!carriesFiles(event)) return;
      event.preventDefault(); // never let the browser open the file in place of the page
      depth = 0;
      dragging(false);
      if (auth) addFiles([...event.dataTransfer.files]);
      else notice(T('notice.dropFirst'));
    });

    // The network: wake waiting uploads when it is back, cut the stuck ones when it goes.
    window.addEventListener('online', () => {
      for (const upload of uploads) {
        if (!upload.run) continue;
        upload.run.tries = 0;
        if (upload.run.wake) upload.run.wake();
      }
      if (recordsFailed) loadRecords();
      loadUnfinished();
    });
    window.addEventListener('offline', () => {
      for (const upload of uploads) {
        if (!upload.run) continue;
        if (upload.run.xhr && upload.run.abortable) upload.run.xhr.abort();
        else if (upload.state === 'waiting') upload.show('waiting', T('upload.offline'));
      }
    });
    window.addEventListener('storage', (event) => { // signed out in another tab
      if (event.key === AUTH_KEY && !event.newValue && auth) showSignedOut(T('notice.otherTab'));
    });
  }

  async function start() {
    wire();
    const facts = loadService();
    await useLanguage(chosenLanguage()); // nothing is shown before its words are there
    say($('drop-hint'), T('upload.dropHint', { count: PARALLEL }));
    restoreOptions();
    const saved = store.get(AUTH_KEY);
    if (saved && saved.user_id && saved.access_token) {
      signIn(saved, false);
    } else { // the forms once the sign-up mode is known, so that no form shows that then goes; a slow answer is not waited for
      await Promise.race([facts, new Promise((resolve) => setTimeout(resolve, 2000))]);
      if (!auth) showSignedOut('');
    }
  }

  start();
})();
