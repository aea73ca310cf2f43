/**
 * POST /v1/audio/transcriptions (and /v1/audio/translations): OpenAI's
 * multipart form — `file`, `model`, `language`, `prompt`, `response_format`
 * (json | text | verbose_json | srt | vtt), `temperature` — answered by the
 * served Whisper model. Long files are transcribed in 30 s windows, one
 * segment each.
 */

import { deflateSync } from 'node:zlib'

import express from 'express'
import type { RequestHandler, Response } from 'express'

import { ValidationError } from '../../errors.js'
import type { Transcription } from '../../transcriber.js'
import { Run } from '../context.js'
import type { AppContext } from '../context.js'
import { badRequest } from '../errors.js'
import { boundaryOf, parseMultipart } from '../multipart.js'

const FORMATS = ['json', 'text', 'verbose_json', 'srt', 'vtt'] as const
type ResponseFormat = (typeof FORMATS)[number]

/** The raw-body parser for the multipart routes (bounded by the server's body limit). */
export function multipartBody(ctx: AppContext): RequestHandler {
  return express.raw({ type: () => true, limit: ctx.maxBodyBytes })
}

function field(fields: Map<string, string[]>, name: string): string | undefined {
  const v = fields.get(name)
  return v === undefined ? undefined : v[v.length - 1]
}

/** The handler; `task` is 'translate' for /v1/audio/translations. */
export function audioTranscriptions(ctx: AppContext, task: 'transcribe' | 'translate' = 'transcribe'): RequestHandler {
  return async (req, res) => {
    const boundary = boundaryOf(req.headers['content-type'])
    if (boundary === undefined) {
      throw badRequest('the request must be multipart/form-data (with the audio in its file field)', null, 'invalid_content_type')
    }
    const body = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0)
    const form = parseMultipart(body, boundary)
    const host = ctx.models.select(field(form.fields, 'model'))
    host.resolveModel(field(form.fields, 'model'))
    const transcriber = host.transcriber()
    const file = form.files.get('file')
    if (!file) throw badRequest('file: an audio file is required (a multipart file part named "file")', 'file')

    const format = (field(form.fields, 'response_format') ?? 'json') as ResponseFormat
    if (!FORMATS.includes(format)) {
      throw badRequest(`response_format: must be one of ${FORMATS.join(', ')}`, 'response_format')
    }
    const tempText = field(form.fields, 'temperature')
    const temperature = tempText === undefined || tempText === '' ? undefined : Number(tempText)
    if (temperature !== undefined && !(Number.isFinite(temperature) && temperature >= 0 && temperature <= 1)) {
      throw badRequest(`temperature: must be a number from 0 to 1, got ${JSON.stringify(tempText)}`, 'temperature')
    }
    const granularities = [...(form.fields.get('timestamp_granularities[]') ?? []), ...(form.fields.get('timestamp_granularities') ?? [])]
    if (granularities.includes('word')) {
      throw badRequest('timestamp_granularities: word timestamps are not supported (segment is)', 'timestamp_granularities')
    }
    if (field(form.fields, 'stream') === 'true') throw badRequest('stream: streamed transcriptions are not supported', 'stream')
    const language = field(form.fields, 'language') || undefined
    const prompt = field(form.fields, 'prompt') || undefined
    const ext = /\.([A-Za-z0-9]{1,8})$/.exec(file.filename)?.[1]?.toLowerCase()
    const hint = ext ?? (file.contentType?.startsWith('audio/') ? file.contentType : undefined)

    const run = new Run(ctx, req, res, 'file')
    await run.answer(async () => {
      let result: Transcription
      try {
        result = await transcriber.transcribe(file.data, { language, prompt, temperature, task, format: hint, signal: run.signal })
      } catch (err) {
        if (err instanceof ValidationError) {
          const param = /language/i.test(err.message) ? 'language' : /prompt/i.test(err.message) ? 'prompt' : null
          throw badRequest(err.message, param)
        }
        throw err
      }
      send(res, format, result, task)
    })
  }
}

function send(res: Response, format: ResponseFormat, r: Transcription, task: string): void {
  const usage = { type: 'duration', seconds: Math.ceil(r.duration) }
  switch (format) {
    case 'json':
      res.json({ text: r.text, usage })
      return
    case 'text':
      res.type('text/plain; charset=utf-8').send(`${r.text}\n`)
      return
    case 'srt':
      res.type('text/plain; charset=utf-8').send(subtitles(r, 'srt'))
      return
    case 'vtt':
      res.type('text/vtt; charset=utf-8').send(subtitles(r, 'vtt'))
      return
    case 'verbose_json':
      res.json({
        task,
        language: r.languageName ?? r.language ?? 'unknown',
        duration: r.duration,
        text: r.text,
        segments: r.segments.map((s) => ({
          id: s.id,
          // Whisper's 10 ms frames from the start of the audio.
          seek: Math.round(s.start * 100),
          start: s.start,
          end: s.end,
          text: s.text,
          tokens: s.tokens,
          temperature: s.temperature,
          avg_logprob: s.avgLogprob,
          compression_ratio: compressionRatio(s.text),
          // Not computed (no no-speech detection): 0.
          no_speech_prob: 0,
        })),
        usage,
      })
      return
  }
}

/** openai-whisper's compression ratio: text bytes over their zlib size. */
function compressionRatio(text: string): number {
  const bytes = Buffer.from(text, 'utf8')
  return bytes.length === 0 ? 0 : bytes.length / deflateSync(bytes).length
}

/** `hh:mm:ss,mmm` (SRT) or `hh:mm:ss.mmm` (VTT). */
export function timestamp(seconds: number, sep: ',' | '.'): string {
  const ms = Math.max(0, Math.round(seconds * 1000))
  const pad = (n: number, w = 2): string => String(n).padStart(w, '0')
  return `${pad(Math.floor(ms / 3_600_000))}:${pad(Math.floor(ms / 60_000) % 60)}:${pad(Math.floor(ms / 1000) % 60)}${sep}${pad(ms % 1000, 3)}`
}

function subtitles(r: Transcription, kind: 'srt' | 'vtt'): string {
  const sep = kind === 'srt' ? ',' : '.'
  const cues = r.segments
    .filter((s) => s.text !== '')
    .map((s, i) => {
      const time = `${timestamp(s.start, sep)} --> ${timestamp(s.end, sep)}`
      return kind === 'srt' ? `${i + 1}\n${time}\n${s.text}\n` : `${time}\n${s.text}\n`
    })
  return kind === 'srt' ? cues.join('\n') : `WEBVTT\n\n${cues.join('\n')}`
}
