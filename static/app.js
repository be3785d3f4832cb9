/* wav2mp3's page: create a user or sign in, upload WAVs through the service's resumable (tus 1.0.0)
   endpoint with the small client below, play and download the MP3s. No framework, no build step. */
(() => {
  'use strict';

  const CHUNK = 5 * 1024 * 1024; // bytes per PATCH: a pause or a retry costs at most this much again
  const PARALLEL = 3; // uploads at once; the others wait their turn
  const BACKOFF = [500, 1000, 2000, 4000, 8000]; // then every STEADY ms, for as long as the page is open
  const STEADY = 10000;
  const STALL = 30000; // a PATCH whose bytes stop moving this long is given up and retried
  const PAGE = 20;
  const AUTH_KEY = 'wav2mp3.auth';
  const OPTIONS_KEY = 'wav2mp3.options';
  const FP_KEY = 'wav2mp3.upload:'; // + JSON [user id, name, size, lastModified, options] -> {url}
  const TUS = { 'Tus-Resumable': '1.0.0' };
  const OFFLINE = 'You are offline. The upload goes on by itself when the network is back.';
  const LIVE = ['queued', 'uploading', 'waiting', 'converting', 'paused'];

  const $ = (id) => document.getElementById(id);
  const url = (path) => new URL(path, document.baseURI).href; // relative: works under a proxy's path prefix
  const enc = encodeURIComponent;

  let auth = null; // {user_id, access_token, name}
  let service = null; // GET /service, once answered: {signup, retention_days, max_upload_bytes}
  let usageAsked = 0; // counts the usage requests: an answer for an older one is dropped
  let cursor = null; // next_cursor of the records shown
  let recordsFailed = false;
  let listing = 0; // counts the lists shown: an answer for an older one is dropped
  const uploads = [];
  const shown = new Map(); // record_id -> <li> in "Your MP3s"

  const store = {
    get(key) { try { return JSON.parse(localStorage.getItem(key)); } catch { return null; } },
    set(key, value) { try { localStorage.setItem(key, JSON.stringify(value)); } catch { /* storage off: no resume after a reload */ } },
    del(key) { try { localStorage.removeItem(key); } catch { /* idem */ } },
    keys() { try { return Object.keys(localStorage); } catch { return []; } },
  };

  // Words for numbers ###########################################################

  function bytes(n) {
    if (n < 1000) return Math.round(n) + ' bytes';
    const units = ['KB', 'MB', 'GB', 'TB'];
    let i = -1;
    do { n /= 1000; i++; } while (n >= 999.5 && i < units.length - 1);
    return (n < 10 ? n.toFixed(1) : Math.round(n)) + ' ' + units[i];
  }

  function duration(seconds) {
    if (seconds < 1) return seconds.toFixed(1) + ' s';
    const t = Math.round(seconds);
    const pad = (x) => String(x).padStart(2, '0');
    const h = Math.floor(t / 3600), m = Math.floor(t / 60) % 60, s = t % 60;
    return h ? `${h}:${pad(m)}:${pad(s)}` : `${m}:${pad(s)}`;
  }

  function period(days) { // RETENTION_DAYS, which may be a fraction
    if (days < 1) {
      const hours = Math.max(1, Math.round(days * 24));
      return hours === 1 ? '1 hour' : `${hours} hours`;
    }
    const rounded = Math.round(days * 10) / 10;
    return rounded === 1 ? '1 day' : `${rounded} days`;
  }

  function sentence(text) { // a message of the service's, shown on its own
    const trimmed = text.trim();
    return trimmed.charAt(0).toUpperCase() + trimmed.slice(1) + (/[.!?]$/.test(trimmed) ? '' : '.');
  }

  function when(iso) {
    const date = iso ? new Date(iso) : new Date();
    return isNaN(date) ? '' : date.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' });
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
    $('settings-summary').textContent = (options.bitrate ? `${options.bitrate} kbps` : `VBR quality ${options.vbr_quality}`) + ' · '
      + ({ 1: 'mono', 2: 'stereo' }[options.channels] || 'channels as recorded');
    if (save) store.set(OPTIONS_KEY, { vbr: $('mode-vbr').checked, bitrate: $('bitrate').value, quality: $('quality').value, channels: options.channels || '' });
  }

  function restoreOptions() {
    const saved = store.get(OPTIONS_KEY);
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
    constructor(file, options) {
      this.file = file;
      this.options = options;
      this.fp = fingerprint(file, options);
      this.url = null; // the upload's URL (Location, absolute: used as given)
      this.offset = 0; // what the service has stored
      this.run = null; // the loop in progress: {stopped, xhr, wake, tries}
      this.state = '';
      this.samples = [];
      const li = $('upload-row').content.firstElementChild.cloneNode(true);
      this.li = li;
      this.el = {};
      for (const name of ['name', 'size', 'figures', 'status', 'detail', 'download', 'pause', 'resume', 'restart', 'retry', 'cancel']) {
        this.el[name] = li.querySelector('.' + name);
      }
      this.el.progress = li.querySelector('progress');
      this.el.audio = li.querySelector('audio');
      this.el.name.textContent = file.name;
      this.el.size.textContent = bytes(file.size);
      this.el.progress.max = Math.max(file.size, 1);
      this.el.progress.setAttribute('aria-label', 'Upload of ' + file.name);
      for (const action of ['pause', 'resume', 'cancel', 'retry', 'restart']) {
        this.el[action].setAttribute('aria-label', this.el[action].textContent + ' ' + file.name);
        this.el[action].addEventListener('click', () => this[action]());
      }
      this.progress(0);
    }

    get size() { return this.file.size; }

    show(state, status, detail = '') {
      this.state = state;
      this.li.dataset.state = state;
      if (this.el.status.textContent !== status) this.el.status.textContent = status;
      if (this.el.detail.textContent !== detail) this.el.detail.textContent = detail;
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
        const next = [...this.li.querySelectorAll('.actions button, a')].find((b) => !b.hidden);
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
      const n = this.el.progress.value;
      let text = `${bytes(n)} of ${bytes(this.size)}`;
      const [t0, n0] = this.samples.length ? this.samples[0] : [now, n];
      if (this.state === 'uploading' && now - t0 > 700 && n > n0 && n < this.size) {
        text += ` · ${bytes((n - n0) / ((now - t0) / 1000))}/s`;
      }
      if (this.el.figures.textContent !== text) this.el.figures.textContent = text;
    }

    metadata() {
      return [['filename', this.file.name], ...Object.entries(this.options)].map(([key, value]) => key + ' ' + b64(value)).join(',');
    }

    start() {
      const run = (this.run = { stopped: false, xhr: null, wake: null, tries: 0, abortable: true });
      this.drive(run)
        .catch((error) => { if (!run.stopped) this.fail('Something went wrong on this page', String(error && error.message)); })
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
      if (!this.url) {
        const saved = store.get(this.fp);
        if (saved && saved.url) { this.url = saved.url; head = true; }
      }
      this.show('uploading', head ? 'Resuming…' : 'Starting…');
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
          if (!(await this.readable(start))) return this.fail('This file cannot be read', 'It may be a folder, or it was moved or deleted after it was chosen.');
          if (run.stopped) return;
          const end = Math.min(this.size, start + CHUNK);
          this.samples = [[performance.now(), start]]; // the speed of this request's bytes
          this.show('uploading', 'Uploading…');
          res = await this.request(run, 'PATCH', this.url, {
            headers: { ...TUS, 'Upload-Offset': String(start), 'Content-Type': 'application/offset+octet-stream' },
            body: this.file.slice(start, end),
            onProgress: (n) => this.progress(start + n),
            onSent: end === this.size ? () => { if (!run.stopped) this.show('converting', 'Converting…'); } : null,
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
        this.show('converting', 'Converting…'); // every byte is in: the record, once stored
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
      if (!navigator.onLine) this.show('waiting', OFFLINE);
      else if (res.status === 0) this.show('waiting', `The connection dropped. Trying again in ${seconds} s…`);
      else if (res.status >= 500 || res.status === 408 || res.status === 429) this.show('waiting', `The service is busy. Trying again in ${seconds} s…`);
      else if (res.status === 423) this.show('converting', 'Converting…'); // every byte is in; the record is being stored
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
      if (step !== 'create') store.del(this.fp); // the service has ended this upload
      this.url = null;
      this.canRetry = false;
      this.stale = null;
      if (status === 415) {
        const kind = await sniff(this.file);
        if (kind === 'WAV') return this.fail('This WAV file uses an encoding this service cannot convert', api + (api ? '. ' : '') + 'Save it as PCM WAV (16 or 24-bit) and try again.');
        return this.fail(kind ? `This is not a WAV file (it looks like ${kind})` : 'This is not a WAV file', 'Only WAV recordings can be converted.');
      }
      // A name taken: 409 at first, 422 since tus clients retry a 409 (as an offset conflict) and lose the message.
      if (step === 'create' && (status === 409 || (status === 422 && /already has a record|holds the name/.test(api)))) {
        this.canRetry = true;
        if (/already has a record/.test(api)) {
          reloadRecords(); // it may come from elsewhere: show it below
          return this.fail('A file with this name is already converted', 'Delete it under “Your MP3s” below, or rename your file, then choose “Try again”.');
        }
        this.stale = storedUploads((parts) => parts[1] === this.file.name).filter(([key]) => key !== this.fp);
        this.canRetry = !this.stale.length;
        return this.fail('This file is still being uploaded (perhaps in another tab)',
          this.stale.length ? 'An earlier upload of this file, with other settings, is unfinished. “Start over” drops it and uploads the file again.'
            : 'Let that upload finish, or rename your file.');
      }
      if (status === 422) {
        return this.fail(step === 'create' ? 'This file cannot be uploaded' : 'This WAV file is damaged or cut short', api);
      }
      if (status === 413 && /quota/.test(api)) { // USER_QUOTA_MB: the service's words name the usage and the quota
        this.canRetry = true; // it may fit once MP3s are deleted
        loadUsage();
        return this.fail('Not enough room left for this file', api);
      }
      if (status === 413) {
        const limit = /(\d+) MiB/.exec(api);
        return this.fail('This file is too large for this service', limit ? `The limit is ${limit[1]} MiB per file.` : '');
      }
      if (status === 404 && step === 'get') return this.fail('This MP3 was deleted before it could be shown');
      return this.fail(`Something went wrong (error ${status})`, api);
    }

    fail(status, detail = '') {
      this.show('failed', status, detail);
    }

    finish(record) {
      store.del(this.fp);
      this.record = record;
      this.progress(this.size);
      this.el.audio.src = record.url;
      this.el.audio.setAttribute('aria-label', 'Play ' + record.filename);
      this.el.download.href = record.url;
      this.el.download.setAttribute('aria-label', 'Download ' + record.filename);
      this.el.download.hidden = false;
      this.el.audio.hidden = false;
      this.show('done', 'Done: ' + record.filename, `${duration(record.duration_seconds)} · MP3 ${bytes(record.size_bytes)}`);
      addRecord(record, true);
      loadUsage();
    }

    forgetRecord() { // its record was deleted below
      this.el.audio.hidden = this.el.download.hidden = true;
      this.el.audio.removeAttribute('src');
      this.show('deleted', 'Deleted');
    }

    pause() {
      this.stop();
      this.show('paused', `Paused at ${Math.floor((100 * this.el.progress.value) / this.size)}%`);
      pump();
    }

    resume() {
      this.show('queued', 'Waiting for its turn…');
      pump();
    }

    cancel() {
      this.stop();
      store.del(this.fp);
      this.show('cancelled', 'Cancelled');
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
      this.show('uploading', 'Starting over…');
      for (const other of uploads) { // rows of the dropped uploads on this page
        if (other !== this && stale.some(([key]) => key === other.fp) && LIVE.includes(other.state)) {
          other.stop();
          other.url = null;
          other.show('cancelled', 'Cancelled: started over');
        }
      }
      await Promise.all(stale.map(([key, saved]) => { store.del(key); return saved.url ? terminate(saved.url) : null; }));
      this.retry();
    }

    terminate() { // tus termination (DELETE): the service drops the bytes and frees the name
      const target = this.url;
      this.url = null;
      store.del(this.fp);
      return terminate(target);
    }
  }

  async function terminate(target, token = auth && auth.access_token) {
    for (let attempt = 0; attempt < 6; attempt++) {
      const res = await http('DELETE', target, { headers: TUS, token });
      if (!retryable(res.status) || res.status === 409) return;
      await new Promise((resolve) => setTimeout(resolve, BACKOFF[Math.min(attempt, BACKOFF.length - 1)]));
    }
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

  function addFiles(files) {
    if (!auth) return;
    const options = currentOptions();
    const top = $('uploads').firstElementChild; // the newest files go first, in the order chosen
    let first = null;
    for (const file of files) {
      const fp = fingerprint(file, options);
      if (uploads.some((u) => u.fp === fp && LIVE.includes(u.state))) continue; // already on its way
      const upload = new Upload(file, options);
      uploads.push(upload);
      $('uploads').insertBefore(upload.li, top);
      first = first || upload.li;
      if (!file.size) upload.fail('This file is empty', 'There is nothing in it to convert.');
      else upload.show('queued', 'Waiting for its turn…');
    }
    pump();
    if (first) first.scrollIntoView({ block: 'nearest' });
  }

  function updateChrome() {
    const rows = $('uploads').children.length;
    $('uploads-head').hidden = !rows;
    $('clear-finished').hidden = !uploads.some((u) => !LIVE.includes(u.state));
    $('resume-hint').hidden = !uploads.some((u) => LIVE.includes(u.state) && u.state !== 'converting');
  }

  function clearFinished() {
    for (const upload of uploads.filter((u) => !LIVE.includes(u.state))) {
      upload.li.remove();
      uploads.splice(uploads.indexOf(upload), 1);
    }
    updateChrome();
    $('upload-title').focus();
  }

  // Records #####################################################################

  function addRecord(record, first) {
    if (shown.has(record.record_id)) return;
    const li = $('record-row').content.firstElementChild.cloneNode(true);
    li.querySelector('.name').textContent = record.title ? `${record.filename} — ${record.title}` : record.filename;
    li.querySelector('.info').textContent = `${duration(record.duration_seconds)} · ${bytes(record.size_bytes)} · ${when(record.created_at)}`;
    const audio = li.querySelector('audio');
    audio.src = record.url;
    audio.setAttribute('aria-label', 'Play ' + record.filename);
    const link = li.querySelector('.download');
    link.href = record.url;
    link.setAttribute('aria-label', 'Download ' + record.filename);
    const button = li.querySelector('.delete');
    button.setAttribute('aria-label', 'Delete ' + record.filename);
    button.addEventListener('click', () => deleteRecord(record, li, button));
    shown.set(record.record_id, li);
    if (first) $('records').prepend(li);
    else $('records').append(li);
    recordsStatus();
  }

  function recordsStatus(text) {
    $('records-status').textContent = text !== undefined ? text : shown.size ? '' : 'No MP3s yet. Converted files appear here.';
  }

  async function loadRecords() {
    if (!auth) return;
    const more = $('more');
    const current = listing;
    more.disabled = true;
    if (!shown.size) recordsStatus('Loading…');
    const res = await http('GET', url(`users/${enc(auth.user_id)}/records?limit=${PAGE}` + (cursor ? '&cursor=' + enc(cursor) : '')));
    if (current !== listing) return;
    more.disabled = false;
    if (res.status === 401 || res.status === 403) return expire();
    recordsFailed = !(res.status === 200 && res.data && Array.isArray(res.data.records));
    if (recordsFailed) {
      return recordsStatus(res.status ? `Your MP3s could not be loaded (${apiMessage(res) || 'error ' + res.status}). Reload the page to try again.`
        : 'Your MP3s could not be loaded: the service cannot be reached. The list loads when the network is back.');
    }
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
    loadRecords();
  }

  async function deleteRecord(record, li, button) {
    if (!confirm(`Delete “${record.filename}”? Its download link stops working.`)) return;
    const error = li.querySelector('.error');
    error.textContent = '';
    button.disabled = true;
    const res = await http('DELETE', url(`record?id=${enc(record.record_id)}&user=${enc(record.user_id || auth.user_id)}`));
    button.disabled = false;
    if (res.status === 401 || res.status === 403) return expire();
    if (res.status !== 204 && res.status !== 404) {
      error.textContent = res.status ? `It could not be deleted (${apiMessage(res) || 'error ' + res.status}). Try again.`
        : 'The service cannot be reached. Check your connection and try again.';
      return;
    }
    const next = li.nextElementSibling || li.previousElementSibling;
    const hadFocus = li.contains(document.activeElement);
    li.remove();
    shown.delete(record.record_id);
    for (const upload of uploads) if (upload.record && upload.record.record_id === record.record_id) upload.forgetRecord();
    recordsStatus(`Deleted ${record.filename}.` + (shown.size ? '' : ' No MP3s left.'));
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
    $('retention').textContent = days ? `MP3s are kept ${period(days)}, then deleted.` : '';
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

  function showUsage(usage) {
    if (usage.name && usage.name !== auth.name) {
      auth.name = usage.name;
      store.set(AUTH_KEY, auth); // shown at once on the next visit
    }
    showWho(auth.name || auth.user_id);
    const quota = typeof usage.quota_bytes === 'number' ? usage.quota_bytes : null;
    $('usage').textContent = 'used ' + bytes(usage.bytes_stored) + (quota === null ? '' : ' of ' + bytes(quota));
    $('usage').classList.toggle('full', quota !== null && usage.bytes_stored >= quota);
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
    $('uploads').replaceChildren();
    listing++;
    $('records').replaceChildren();
    shown.clear();
    cursor = null;
    $('more').hidden = true;
    recordsStatus('');
    updateChrome();
  }

  function notice(text) {
    $('notice').textContent = text;
    $('notice').hidden = !text;
  }

  function signIn(credentials, fresh, usage) {
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
    if (usage) {
      usageAsked++;
      showUsage(usage);
    } else {
      loadUsage();
    }
    loadRecords();
  }

  function showSignedOut(message) {
    auth = null;
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
    showSignedOut('Your sign-in is no longer valid (perhaps the access token was replaced). Please sign in again with your user ID and access token.');
    $('sign-in-id').value = id;
    $('sign-in-token').focus();
  }

  function signOut() {
    const unfinished = uploads.filter((u) => LIVE.includes(u.state));
    const kept = storedUploads(() => true); // resumable uploads of this user, from this page or an earlier one
    const count = unfinished.length + kept.filter(([key]) => !unfinished.some((u) => u.fp === key)).length;
    if (count && !confirm(`${count === 1 ? 'One upload is' : count + ' uploads are'} not finished: signing out stops and drops ${count === 1 ? 'it' : 'them'}. Sign out?`)) return;
    const token = auth.access_token;
    const urls = new Set(kept.map(([, saved]) => saved.url));
    for (const upload of unfinished) {
      upload.stop();
      urls.add(upload.url);
    }
    for (const target of urls) if (target) terminate(target, token); // frees their names on the service
    for (const [key] of kept) store.del(key); // forget what this page kept for this user
    store.del(AUTH_KEY);
    showSignedOut('You are signed out.');
    $('create-name').focus();
  }

  async function createUser(event) {
    event.preventDefault();
    const name = $('create-name').value.trim();
    const invite = $('invite-field').hidden ? null : $('create-invite').value.trim();
    const error = $('create-error');
    const button = event.target.querySelector('button');
    if (!name) { error.textContent = 'Enter a name.'; $('create-name').focus(); return; }
    if (invite === '') { error.textContent = 'Enter the invite code you were given.'; $('create-invite').focus(); return; }
    error.textContent = '';
    button.disabled = true;
    const res = await http('POST', url('users'), { json: invite === null ? { name } : { name, invite }, token: '' });
    button.disabled = false;
    if (res.status === 201 && res.data && res.data.access_token) {
      event.target.reset();
      return signIn({ ...res.data, name }, true);
    }
    if (res.status === 200 && res.data && res.data.error_name) error.textContent = 'That name is taken. Please choose another one.';
    else if (res.status === 422) error.textContent = 'This name cannot be used' + (apiMessage(res) ? ` (${apiMessage(res)}).` : '.');
    else if (res.status === 403) { // sign-up is by invite or closed: the service says what is needed
      error.textContent = sentence(apiMessage(res) || 'Sign-up is not open on this service');
      await loadService(); // perhaps the operator changed it since the page was loaded
      if (!$('invite-field').hidden) { $('create-invite').focus(); return; }
    }
    else if (!res.status) error.textContent = 'The service cannot be reached. Check your connection and try again.';
    else error.textContent = `The user could not be created (${apiMessage(res) || 'error ' + res.status}). Try again shortly.`;
    $('create-name').focus();
  }

  async function signInForm(event) {
    event.preventDefault();
    const id = $('sign-in-id').value.trim();
    const token = $('sign-in-token').value.trim();
    const error = $('sign-in-error');
    const button = event.target.querySelector('button');
    if (!id || !token) {
      error.textContent = 'Enter both your user ID and your access token.';
      $(id ? 'sign-in-token' : 'sign-in-id').focus();
      return;
    }
    error.textContent = '';
    button.disabled = true;
    const res = await http('GET', url(`users/${enc(id)}`), { token }); // the credentials checked, and the name and usage
    button.disabled = false;
    if (res.status === 200 && res.data) {
      event.target.reset();
      signIn({ user_id: id, access_token: token, name: res.data.name }, false, res.data);
      $('upload-title').focus();
      return;
    }
    if ([401, 403, 404, 422].includes(res.status)) error.textContent = 'Unknown user ID or wrong access token. Check both and try again.';
    else if (!res.status) error.textContent = 'The service cannot be reached. Check your connection and try again.';
    else error.textContent = `You could not be signed in (${apiMessage(res) || 'error ' + res.status}). Try again shortly.`;
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
    button.textContent = copied ? 'Copied' : 'Now press Ctrl+C';
    setTimeout(() => { button.textContent = 'Copy'; }, 2500);
  }

  // Wiring ######################################################################

  function wire() {
    $('create-form').addEventListener('submit', createUser);
    $('sign-in-form').addEventListener('submit', signInForm);
    $('sign-out').addEventListener('click', signOut);
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
      else notice('Create a user or sign in first, then drop your files.');
    });

    // The network: wake waiting uploads when it is back, cut the stuck ones when it goes.
    window.addEventListener('online', () => {
      for (const upload of uploads) {
        if (!upload.run) continue;
        upload.run.tries = 0;
        if (upload.run.wake) upload.run.wake();
      }
      if (recordsFailed) loadRecords();
    });
    window.addEventListener('offline', () => {
      for (const upload of uploads) {
        if (!upload.run) continue;
        if (upload.run.xhr && upload.run.abortable) upload.run.xhr.abort();
        else if (upload.state === 'waiting') upload.show('waiting', OFFLINE);
      }
    });
  }

  window.addEventListener('storage', (event) => { // signed out in another tab
    if (event.key === AUTH_KEY && !event.newValue && auth) showSignedOut('You signed out in another tab.');
  });

  wire();
  restoreOptions();
  const facts = loadService();
  const saved = store.get(AUTH_KEY);
  if (saved && saved.user_id && saved.access_token) {
    signIn(saved, false);
  } else { // the forms once the sign-up mode is known, so that no form shows that then goes; a slow answer is not waited for
    Promise.race([facts, new Promise((resolve) => setTimeout(resolve, 2000))]).then(() => { if (!auth) showSignedOut(''); });
  }
})();
