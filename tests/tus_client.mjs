// One upload with the real tus-js-client (package.json pins it), as a Node application sends it; test_wav2mp3.py
// runs it against a live server: `node tests/tus_client.mjs '<job>'`, or the job on standard input.
//
// The job, JSON:
//   endpoint    the creation URL, http://127.0.0.1:<port>/users/<user_id>/uploads
//   token       the user's access token, sent as `Authorization: Bearer <token>`
//   file        the WAV's path
//   input       "file" (default: an fs.ReadStream, which tus-js-client reopens by its path for each slice) or "buffer"
//   metadata    Upload-Metadata, e.g. {"filename": "call.wav", "bitrate": "96"}
//   chunkSize   bytes per PATCH (default: the whole file in one)
//   options     any other tus.Upload option JSON can hold, passed as given: parallelUploads, uploadLengthDeferred,
//               uploadDataDuringCreation, addRequestId, protocol, retryDelays, uploadUrl, overridePatchMethod...
//   urlStorage  a file for tus-js-client's FileUrlStorage, where it keeps the upload's URL under the file's
//               fingerprint (Node's default keeps nothing); with it, an Upload first looks there for the file
//               (findPreviousUploads) and resumes the newest it finds (resumeFromPreviousUpload), as tus-js-client's
//               README does: a run goes on with what an earlier run left (an upload before a server restart)
//   interrupt   {"afterBytes": N, "then": ...}: abort() once the server has accepted N bytes or more (between two
//               PATCHes, at onChunkComplete; with parallelUploads, once N bytes are sent: onProgress), and fewer
//               than the file's (with uploadLengthDeferred, tus-js-client's bytesTotal is null until the last PATCH), then
//                 "stop"       report and end (resume in another run, with options.uploadUrl);
//                 "start"      start() the same Upload again (tus-js-client's pause and resume);
//                 "new-upload" a new Upload of the same file: with urlStorage, what it finds there (above),
//                              else options.uploadUrl = the URL so far.
//
// It prints one JSON line, whatever became of the upload:
//   {ok, url, error, status, requests: ["POST 201", "PATCH 204", ...], requestIds, retries, accepted, interrupted}
// `error` is tus-js-client's message (it quotes the server's answer), `status` the status of the response it
// failed on, `requests` every response seen (onAfterResponse: a request cut off has none), `requestIds` the
// X-Request-ID each request carried (null without addRequestId), `retries` how many times tus-js-client's own
// onShouldRetry decided to try again, `accepted` the last offset the server answered.
// A job that cannot be read exits 2.

import fs from 'node:fs'
import * as tus from 'tus-js-client'

async function readJob() {
  if (process.argv[2]) return JSON.parse(process.argv[2])
  const chunks = []
  for await (const chunk of process.stdin) chunks.push(chunk)
  return JSON.parse(Buffer.concat(chunks).toString('utf8'))
}

function run(job) {
  const outcome = { ok: false, url: null, error: null, status: null, requests: [], requestIds: [], retries: 0, accepted: 0, interrupted: false }
  const interrupt = job.interrupt ?? null
  let interrupted = false
  const fileSize = fs.statSync(job.file).size

  return new Promise((resolve) => {
    const finish = (fields) => resolve({ ...outcome, ...fields })

    function newUpload(extra = {}) {
      const input = job.input === 'buffer' ? fs.readFileSync(job.file) : fs.createReadStream(job.file)
      const upload = new tus.Upload(input, {
        endpoint: job.endpoint,
        headers: { Authorization: `Bearer ${job.token}` },
        metadata: job.metadata ?? {},
        ...(job.chunkSize ? { chunkSize: job.chunkSize } : {}),
        ...(job.urlStorage ? { urlStorage: new tus.FileUrlStorage(job.urlStorage) } : {}),
        ...job.options,
        ...extra,
        onAfterResponse(req, res) {
          outcome.requests.push(`${req.getMethod()} ${res.getStatus()}`)
          outcome.requestIds.push(req.getHeader('X-Request-ID') ?? null)
        },
        // The library's own decision, only counted: the client stays unchanged.
        onShouldRetry(err, attempt, options) {
          const retry = tus.defaultOptions.onShouldRetry(err, attempt, options)
          if (retry) outcome.retries += 1
          return retry
        },
        onChunkComplete(_chunkSize, bytesAccepted, bytesTotal) {
          outcome.accepted = bytesAccepted
          interruptAt(upload, bytesAccepted, bytesTotal)
        },
        // With parallelUploads the pieces' chunks are not the file's: its progress says how far it is.
        onProgress(bytesSent, bytesTotal) {
          if ((job.options?.parallelUploads ?? 1) > 1) interruptAt(upload, bytesSent, bytesTotal)
        },
        onSuccess() {
          finish({ ok: true, url: upload.url, interrupted })
        },
        onError(err) {
          finish({ url: upload.url, error: err.message, status: err.originalResponse?.getStatus() ?? null, interrupted })
        },
      })
      return upload
    }

    function interruptAt(upload, bytes, bytesTotal) {
      if (interrupt && !interrupted && bytes >= interrupt.afterBytes && bytes < (bytesTotal ?? fileSize)) {
        interrupted = true
        upload.abort().then(() => resume(upload))
      }
    }

    async function resume(aborted) {
      const then = interrupt.then ?? 'stop'
      if (then === 'stop') {
        finish({ url: aborted.url, interrupted: true })
      } else if (then === 'start') {
        aborted.start()
      } else if (then === 'new-upload') {
        await resumeOrStart(newUpload(job.urlStorage ? {} : { uploadUrl: aborted.url }))
      } else {
        finish({ error: `interrupt.then must be stop, start or new-upload, not ${then}` })
      }
    }

    async function resumeOrStart(upload) {
      const previous = job.urlStorage ? await upload.findPreviousUploads() : []
      if (previous.length > 0) {
        previous.sort((a, b) => Date.parse(b.creationTime) - Date.parse(a.creationTime))
        upload.resumeFromPreviousUpload(previous[0])
      }
      upload.start()
    }

    resumeOrStart(newUpload())
  })
}

let job
try {
  job = await readJob()
} catch (err) {
  process.stderr.write(`the job is not JSON: ${err.message}\n`)
  process.exit(2)
}
process.stdout.write(`${JSON.stringify(await run(job))}\n`)
