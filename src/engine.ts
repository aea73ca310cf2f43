/**
 * {@link Engine}: load a model once, then run many requests on it at the same
 * time. Requests are batched together by the native engine (continuous
 * batching over a paged KV cache); each call here is one or more requests.
 */

import { resolve } from 'node:path'

import { AbortError, ClosedError, ContextLengthError, InternalError, LoadError, ValidationError, abortErrorFor, fromNative, inputError } from './errors.js'
import { loadDeferred, partModality, resolveParts, templatePart } from './media/index.js'
import type { MediaPolicy, Modality, PendingPart, ResolvedMedia } from './media/index.js'
import { locateModel } from './model-source.js'
import { bindingFor } from './native.js'
import type {
  NativeEngine,
  NativeEvent,
  NativeMediaItem,
  NativeRequest,
  NativeSamplingParams,
  NativeSubmitted,
  NativeTokenLogprob,
} from './native.js'
import type {
  ChatMessage,
  ChatParams,
  CompletionOutput,
  EngineStats,
  FinishReason,
  LoadOptions,
  LoadProgress,
  ModelInfo,
  PromptInput,
  Quantization,
  SampleOutput,
  SamplingParams,
  StreamChunk,
  TokenLogprob,
  Usage,
  VideoFrameLoss,
} from './types.js'
import {
  validateChatExtras,
  validateLoadOptions,
  validateMessages,
  validatePrompt,
  validatePromptMedia,
  type MediaPartHook,
  validatePrompts,
  validateSamplingParams,
} from './validate.js'

/** Default maxTokens of {@link Engine.generate} and {@link Engine.generateStream}, as vLLM's. */
export const DEFAULT_GENERATE_MAX_TOKENS = 16

/**
 * The native load's progress callback for a user's listener. A listener
 * that throws must not take the process down (the call comes from a native
 * thread): its error becomes a process warning and it is not called again.
 */
function progressListener(listener: ((p: LoadProgress) => void) | undefined): ((p: LoadProgress) => void) | undefined {
  if (!listener) return undefined
  let failed = false
  return (p) => {
    if (failed) return
    try {
      listener({ loadedParameters: p.loadedParameters, totalParameters: p.totalParameters })
    } catch (err) {
      failed = true
      queueMicrotask(() => process.emitWarning(`onLoadProgress threw: ${String(err)}`))
    }
  }
}

function convertLogprobs(lps: NativeTokenLogprob[]): TokenLogprob[] {
  return lps.map((lp) => ({
    tokenId: lp.tokenId,
    token: lp.token,
    logprob: lp.logprob,
    topLogprobs: lp.top.map((t) => ({ tokenId: t.tokenId, token: t.token, logprob: t.logprob })),
  }))
}

function toNativeMedia(m: ResolvedMedia, requestKwargs: Record<string, unknown> | undefined): NativeMediaItem {
  const kwargs = requestKwargs === undefined && m.kwargs === undefined ? undefined : { ...requestKwargs, ...m.kwargs }
  return {
    modality: m.modality,
    data: m.data,
    frames: m.frames,
    kwargs: m.modality === 'audio' ? undefined : kwargs,
    samples: m.samples,
    sampleRate: m.sampleRate,
    format: m.format,
    uuid: m.uuid,
    embeds: m.embeds,
    embedsShape: m.embedsShape,
    embedsBlob: m.embedsBlob,
    gridBlob: m.gridBlob,
    gridThw: m.gridThw,
  }
}

/** The request-level processor options (validated with the sampling params). */
function mmKwargsOf(params: SamplingParams): Record<string, unknown> | undefined {
  return params.mmProcessorKwargs as Record<string, unknown> | undefined
}

/**
 * The validator hook for media parts: the template gets a placeholder part;
 * the part itself (with where it stood) is collected into `into`.
 */
function mediaPlaceholder(into?: PendingPart[]): MediaPartHook {
  return (part, path) => {
    const modality = partModality(part.type as string)
    if (modality === undefined) throw new ValidationError(`${path}: unknown content part type ${JSON.stringify(part.type)}`)
    into?.push({ part, path, modality })
    return templatePart(modality)
  }
}

function convertUsage(u: { promptTokens: number; completionTokens: number; cachedTokens: number }): Usage {
  return { promptTokens: u.promptTokens, completionTokens: u.completionTokens, cachedTokens: u.cachedTokens }
}

/** One running request: its event batches as an async iterable. */
class RequestRun {
  #done = false
  #aborted = false

  constructor(
    private readonly engine: Engine,
    private readonly nativeEngine: NativeEngine,
    readonly id: number,
    private readonly signal: AbortSignal | undefined,
    /** Video frames `frame_recovery` replaced or left out while the prompt was prepared. */
    readonly videoFrames: VideoFrameLoss | undefined,
  ) {}

  /** Abort the request (idempotent; no-op once it is over). */
  cancel(): void {
    if (this.#done || this.#aborted) return
    this.#aborted = true
    try {
      this.nativeEngine.abort(this.id)
    } catch {
      // The engine is gone; nothing left to free.
    }
  }

  /** Event batches until the request is over; throws AbortError / Error. */
  async *batches(): AsyncGenerator<NativeEvent[], void, undefined> {
    const onAbort = (): void => this.cancel()
    this.signal?.addEventListener('abort', onAbort, { once: true })
    try {
      if (this.signal?.aborted) this.cancel()
      for (;;) {
        const batch = await this.nativeEngine.next(this.id).catch((err: unknown) => {
          throw fromNative(err)
        })
        if (batch.aborted || this.#aborted) {
          this.#done = true
          if (this.signal?.aborted) throw abortErrorFor(this.signal)
          if (this.engine.closed) throw new ClosedError('the engine was closed while the request was running')
          throw new AbortError('The request was aborted')
        }
        const failure = batch.events.find((e) => e.kind === 'error')
        if (failure) {
          this.#done = true
          throw new InternalError(failure.message ?? 'the request failed')
        }
        if (batch.done) this.#done = true
        if (batch.events.length > 0) yield batch.events
        if (batch.done) return
      }
    } finally {
      this.signal?.removeEventListener('abort', onAbort)
      // Left early (break, throw in the consumer's loop body, error): free the request.
      if (!this.#done) this.cancel()
    }
  }
}

/** Accumulates the events of one request into per-sample outputs. */
class Collector {
  readonly samples: Array<SampleOutput & { usage?: Usage }> = []
  constructor(
    n: number,
    private readonly wantLogprobs: boolean,
  ) {
    for (let i = 0; i < n; i++) this.samples.push(this.#empty(i))
  }

  #empty(index: number): SampleOutput {
    const s: SampleOutput = { index, text: '', tokenIds: [], finishReason: 'abort', stopReason: null }
    if (this.wantLogprobs) s.logprobs = []
    return s
  }

  add(ev: NativeEvent): void {
    const s = (this.samples[ev.index] ??= this.#empty(ev.index))
    if (ev.kind === 'tokens') {
      s.text += ev.text
      for (const t of ev.tokenIds) s.tokenIds.push(t)
      if (ev.logprobs && s.logprobs) for (const lp of convertLogprobs(ev.logprobs)) s.logprobs.push(lp)
    } else if (ev.kind === 'finished') {
      s.text += ev.text
      s.finishReason = (ev.finishReason ?? 'stop') as FinishReason
      s.stopReason = ev.stopReason ?? null
      if (ev.usage) s.usage = convertUsage(ev.usage)
    }
  }

  output(): CompletionOutput {
    const outputs: SampleOutput[] = this.samples.map(({ usage: _u, ...s }) => s)
    const first = this.samples.find((s) => s.usage)?.usage
    const usage: Usage = {
      promptTokens: first?.promptTokens ?? 0,
      completionTokens: this.samples.reduce((acc, s) => acc + s.tokenIds.length, 0),
      cachedTokens: first?.cachedTokens ?? 0,
    }
    const head = outputs[0]!
    return { ...head, usage, outputs }
  }
}

/**
 * A loaded model and its engine. Create one with {@link Engine.load}; many
 * calls may run at once and are batched together. Call {@link Engine.close}
 * when done.
 *
 * @example
 * ```ts
 * const engine = await Engine.load({ model: 'default' })
 * const [out] = await engine.generate('The capital of France is', { maxTokens: 8, temperature: 0 })
 * console.log(out.text)
 * for await (const chunk of engine.chatStream([{ role: 'user', content: 'Hi!' }], { maxTokens: 64 })) {
 *   process.stdout.write(chunk.text)
 * }
 * await engine.close()
 * ```
 */
export class Engine {
  readonly #native: NativeEngine
  readonly #info: ModelInfo
  readonly #media: MediaPolicy
  #closed = false
  #closing: Promise<void> | undefined

  private constructor(nativeEngine: NativeEngine, path: string, opts: LoadOptions, name: string | undefined) {
    this.#native = nativeEngine
    const i = nativeEngine.info()
    const modalities = i.modalities as Modality[]
    this.#media = {
      accepts: new Set(modalities),
      limitMmPerPrompt: opts.limitMmPerPrompt,
      allowedLocalMediaPath: opts.allowedLocalMediaPath,
      enableMmEmbeds: opts.enableMmEmbeds,
      allowedMediaDomains: opts.allowedMediaDomains,
      allowPrivateMediaUrls: opts.allowPrivateMediaUrls,
      resolveMediaHost: opts.resolveMediaHost,
    }
    this.#info = {
      // A hub model's files sit in a folder named by commit: its repo id is the name.
      name: name ?? i.name,
      path,
      architecture: i.architecture,
      maxModelLen: i.maxModelLen,
      vocabSize: i.vocabSize,
      eosTokenIds: i.eosTokenIds,
      bosTokenId: i.bosTokenId ?? null,
      hasChatTemplate: i.hasChatTemplate,
      chatTemplate: i.chatTemplate ?? null,
      device: i.device,
      threads: i.threads,
      modalities,
      blockSize: i.blockSize,
      numKvBlocks: i.numKvBlocks,
      enablePrefixCaching: i.enablePrefixCaching,
      kvCacheBytes: i.kvCacheBytes,
      kvCacheTokens: i.kvCacheTokens,
      quantization: (i.quantization ?? null) as Quantization | null,
      loadSeconds: i.loadSeconds,
      anonRssBytes: i.anonRssBytes ?? null,
    }
  }

  /**
   * Load a model and start its engine. Loading runs off the JS thread.
   * Without `model` (or with `'default'`) it loads SmolLM2-135M-Instruct,
   * downloading it once into the cache dir.
   *
   * @throws {ValidationError} for bad options
   * @throws {LoadError} for a missing model, an unavailable device or files the loader refuses
   * @throws {HubError} when a hub model cannot be fetched
   */
  static async load(options: LoadOptions = {}): Promise<Engine> {
    const opts = validateLoadOptions(options)
    const source = await locateModel(opts.model, opts.onDownloadProgress ? { onDownloadProgress: opts.onDownloadProgress } : {})
    const path = source.path
    const { binding, device } = bindingFor(opts.device)
    const nativeEngine = await binding.NativeEngine.load({
      model: path,
      device,
      dtype: opts.dtype,
      quantization: opts.quantization,
      quantizationTowers: opts.quantizationTowers,
      mmproj: opts.mmproj === undefined ? undefined : resolve(opts.mmproj),
      chatTemplate: opts.chatTemplate,
      maxModelLen: opts.maxModelLen,
      blockSize: opts.blockSize,
      kvCacheBytes: opts.kvCacheBytes,
      gpuMemoryUtilization: opts.gpuMemoryUtilization,
      maxNumSeqs: opts.maxNumSeqs,
      threads: opts.threads,
      maxNumBatchedTokens: opts.maxNumBatchedTokens,
      enablePrefixCaching: opts.enablePrefixCaching,
      mmProcessorCacheGb: opts.mmProcessorCacheGb,
      encoderCacheTokens: opts.encoderCacheTokens,
      mediaIoKwargs: opts.mediaIoKwargs,
      enableMmEmbeds: opts.enableMmEmbeds,
    }, progressListener(opts.onLoadProgress)).catch((err: unknown) => {
      // The loader's refusals (unsupported architecture, bad files) are about the model.
      throw fromNative(err, { invalid: (message, cause) => new LoadError(message, { code: 'load_failed', cause }) })
    })
    return new Engine(nativeEngine, path, opts, source.repo)
  }

  /** Facts about the loaded model. */
  get info(): ModelInfo {
    return { ...this.#info, eosTokenIds: [...this.#info.eosTokenIds] }
  }

  /** Whether {@link Engine.close} was called. */
  get closed(): boolean {
    return this.#closed
  }

  #checkOpen(): void {
    if (this.#closed) throw new ClosedError('the engine is closed')
  }

  /**
   * Submit a request. Its media parts are resolved first (URLs, base64, raw
   * samples); the native side then renders and tokenizes the prompt and
   * decodes and preprocesses the media off the JS thread. Bad input rejects
   * with a ValidationError (a ContextLengthError when it does not fit) or a
   * MediaError; `promptParam` names the prompt's field for them.
   */
  async #start(
    request: NativeRequest,
    promptParam: string,
    parts: PendingPart[],
    signal: AbortSignal | undefined,
    mmKwargs?: Record<string, unknown>,
  ): Promise<RequestRun> {
    this.#checkPromptLength(request, promptParam)
    let media: ResolvedMedia[] = []
    if (parts.length > 0) {
      try {
        media = await resolveParts(parts, { ...this.#media, deferUuidFetches: true, ...(signal ? { signal } : {}) })
        // URL items with a uuid went unfetched: fetch only those no cache holds.
        media = await this.#loadUncached(media, mmKwargs)
      } catch (err) {
        if (signal?.aborted) throw abortErrorFor(signal)
        throw err
      }
    }
    const submit = async (items: ResolvedMedia[]): Promise<NativeSubmitted> => {
      if (signal?.aborted) throw abortErrorFor(signal)
      this.#checkOpen()
      return this.#native.addRequest(request, items.length > 0 ? items.map((m) => toNativeMedia(m, mmKwargs)) : null).catch((err: unknown) => {
        throw fromNative(err, { promptParam })
      })
    }
    let r = await submit(media)
    // A cache evicted a deferred item between the query and the submission.
    if (r.error?.code === 'uuid_miss' && media.some((m) => m.load)) r = await submit(await loadDeferred(media))
    if (r.error) throw inputError(r.error, promptParam)
    const lost = r.videoFramesRecovered + r.videoFramesDropped > 0
    return new RequestRun(this, this.#native, r.requestId!, signal, lost ? { recovered: r.videoFramesRecovered, dropped: r.videoFramesDropped } : undefined)
  }

  /**
   * A token-id prompt the context cannot hold is refused here, before its
   * media are fetched and its ids cross to the engine (which words the same
   * refusal of a text prompt alike).
   */
  #checkPromptLength(request: NativeRequest, promptParam: string): void {
    const n = request.promptTokenIds?.length
    const max = this.#info.maxModelLen
    if (n !== undefined && n >= max) {
      throw new ContextLengthError(`the prompt has ${n} tokens, but the model's maximum length is ${max} (prompt + output)`, { param: promptParam })
    }
  }

  /** Fetch the deferred items that no cache holds (one native query for all). */
  async #loadUncached(media: ResolvedMedia[], mmKwargs: Record<string, unknown> | undefined): Promise<ResolvedMedia[]> {
    const deferred = media.filter((m) => m.load)
    if (deferred.length === 0) return media
    let uncached: boolean[]
    try {
      uncached = this.#native.uncachedUuids(
        deferred.map((m) => {
          const n = toNativeMedia(m, mmKwargs)
          return { modality: n.modality, uuid: m.uuid!, kwargs: n.kwargs }
        }),
        media.map((m) => m.modality),
      )
    } catch (err) {
      throw fromNative(err)
    }
    const fetch = new Set(deferred.filter((_, i) => uncached[i]))
    return Promise.all(media.map((m) => (fetch.has(m) ? m.load!() : m)))
  }

  async #collect(run: RequestRun, params: NativeSamplingParams): Promise<CompletionOutput> {
    const c = new Collector(params.n ?? 1, params.logprobs !== undefined)
    for await (const batch of run.batches()) for (const ev of batch) c.add(ev)
    const out = c.output()
    if (run.videoFrames) out.videoFrames = run.videoFrames
    return out
  }

  async *#chunks(run: RequestRun): AsyncGenerator<StreamChunk, void, undefined> {
    let report = run.videoFrames
    for await (const batch of run.batches()) {
      for (const ev of batch) {
        let chunk: StreamChunk
        if (ev.kind === 'tokens') {
          chunk = { index: ev.index, text: ev.text, tokenIds: ev.tokenIds }
          if (ev.logprobs) chunk.logprobs = convertLogprobs(ev.logprobs)
        } else if (ev.kind === 'finished') {
          chunk = {
            index: ev.index,
            text: ev.text,
            tokenIds: [],
            finishReason: (ev.finishReason ?? 'stop') as FinishReason,
            stopReason: ev.stopReason ?? null,
          }
          if (ev.usage) chunk.usage = convertUsage(ev.usage)
        } else continue
        if (report) {
          chunk.videoFrames = report
          report = undefined
        }
        yield chunk
      }
    }
  }

  /**
   * Complete one prompt or a batch of prompts; all of them run together.
   * Resolves to one output per prompt, in order.
   *
   * @param prompts a string, `{ prompt }`, `{ promptTokenIds }`, or an array of them.
   * @param params sampling parameters shared by all prompts (maxTokens defaults to 16).
   */
  async generate(prompts: PromptInput | PromptInput[], params: SamplingParams = {}): Promise<CompletionOutput[]> {
    this.#checkOpen()
    const requests = validatePrompts(prompts)
    const list = Array.isArray(prompts) ? prompts : [prompts]
    const media = list.map((p, i) => validatePromptMedia(p, Array.isArray(prompts) ? `prompts[${i}]` : 'prompt'))
    const sp = validateSamplingParams(params, { chat: false })
    const signal = params.signal
    if (signal?.aborted) throw abortErrorFor(signal)
    // Prompts' media are fetched and preprocessed side by side, not one after another.
    const started = await Promise.allSettled(
      requests.map((r, i) =>
        this.#start(
          { ...r, params: sp, defaultMaxTokens: DEFAULT_GENERATE_MAX_TOKENS },
          Array.isArray(prompts) ? `prompts[${i}]` : 'prompt',
          media[i] ?? [],
          signal,
          mmKwargsOf(params),
        ),
      ),
    )
    const runs = started.flatMap((s) => (s.status === 'fulfilled' ? [s.value] : []))
    const failed = started.find((s): s is PromiseRejectedResult => s.status === 'rejected')
    if (failed) {
      for (const run of runs) run.cancel()
      throw failed.reason
    }
    try {
      return await Promise.all(runs.map((run) => this.#collect(run, sp)))
    } catch (err) {
      for (const run of runs) run.cancel()
      throw err
    }
  }

  /**
   * Stream the completion of one prompt, chunk by chunk. Breaking out of the
   * loop aborts the request.
   */
  async *generateStream(prompt: PromptInput, params: SamplingParams = {}): AsyncGenerator<StreamChunk, void, undefined> {
    this.#checkOpen()
    const request = validatePrompt(prompt)
    const media = validatePromptMedia(prompt)
    const sp = validateSamplingParams(params, { chat: false })
    if (params.signal?.aborted) throw abortErrorFor(params.signal)
    const req = { ...request, params: sp, defaultMaxTokens: DEFAULT_GENERATE_MAX_TOKENS }
    yield* this.#chunks(await this.#start(req, 'prompt', media, params.signal, mmKwargsOf(params)))
  }

  /** The native request of a chat, and its media parts in prompt order. */
  #chatRequest(messages: ChatMessage[], params: ChatParams): { request: NativeRequest; parts: PendingPart[] } {
    const parts: PendingPart[] = []
    const msgs = validateMessages(messages, mediaPlaceholder(parts))
    const sp = validateSamplingParams(params, { chat: true })
    return { request: { messages: msgs, ...validateChatExtras(params), params: sp }, parts }
  }

  /**
   * Answer a conversation with the model's chat template. maxTokens defaults
   * to the rest of the context.
   */
  async chat(messages: ChatMessage[], params: ChatParams = {}): Promise<CompletionOutput> {
    this.#checkOpen()
    const { request, parts } = this.#chatRequest(messages, params)
    if (params.signal?.aborted) throw abortErrorFor(params.signal)
    const run = await this.#start(request, 'messages', parts, params.signal, mmKwargsOf(params))
    return this.#collect(run, request.params ?? {})
  }

  /**
   * Stream the answer to a conversation. Breaking out of the loop (or
   * aborting `signal`) aborts the request and frees its KV blocks.
   *
   * @example
   * ```ts
   * for await (const chunk of engine.chatStream(messages, { maxTokens: 64 })) process.stdout.write(chunk.text)
   * ```
   */
  async *chatStream(messages: ChatMessage[], params: ChatParams = {}): AsyncGenerator<StreamChunk, void, undefined> {
    this.#checkOpen()
    const { request, parts } = this.#chatRequest(messages, params)
    if (params.signal?.aborted) throw abortErrorFor(params.signal)
    yield* this.#chunks(await this.#start(request, 'messages', parts, params.signal, mmKwargsOf(params)))
  }

  /**
   * Token ids of `text` (with BOS etc. unless `addSpecialTokens` is false).
   * Tokenizes on a worker thread: a long text never blocks the event loop.
   */
  async tokenize(text: string, options: { addSpecialTokens?: boolean } = {}): Promise<number[]> {
    this.#checkOpen()
    if (typeof text !== 'string') throw new ValidationError(`text must be a string, got ${typeof text}`)
    return this.#native.tokenize(text, options.addSpecialTokens ?? true).catch((err: unknown) => {
      throw fromNative(err)
    })
  }

  /** Text of `tokenIds` (special tokens dropped unless `skipSpecialTokens` is false), decoded on a worker thread. */
  async detokenize(tokenIds: number[], options: { skipSpecialTokens?: boolean } = {}): Promise<string> {
    this.#checkOpen()
    checkTokenIds(tokenIds)
    return this.#native.detokenize(tokenIds, options.skipSpecialTokens ?? true).catch((err: unknown) => {
      throw fromNative(err, { promptParam: 'tokenIds' })
    })
  }

  /**
   * The text of each token on its own, special tokens included (vLLM's
   * `token_strs`): joined, they give the detokenized text.
   */
  async tokenTexts(tokenIds: number[]): Promise<string[]> {
    this.#checkOpen()
    checkTokenIds(tokenIds)
    return this.#native.tokenTexts(tokenIds).catch((err: unknown) => {
      throw fromNative(err, { promptParam: 'tokenIds' })
    })
  }

  /** The prompt text the chat template makes of `messages`, rendered on a worker thread. */
  async applyChatTemplate(
    messages: ChatMessage[],
    options: Pick<ChatParams, 'chatTemplateKwargs' | 'tools' | 'addGenerationPrompt'> = {},
  ): Promise<string> {
    this.#checkOpen()
    const msgs = validateMessages(messages, mediaPlaceholder())
    const extras = validateChatExtras(options)
    return this.#native.applyChatTemplate(msgs, extras.addGenerationPrompt ?? true, extras.tools, extras.chatTemplateKwargs).catch((err: unknown) => {
      throw fromNative(err, { promptParam: 'messages' })
    })
  }

  /** Engine counters (requests, KV blocks, prefix cache, tokens). */
  stats(): EngineStats {
    this.#checkOpen()
    const s = this.#native.stats()
    return {
      running: s.running,
      waiting: s.waiting,
      kvBlocksTotal: s.kvBlocksTotal,
      kvBlocksUsed: s.kvBlocksUsed,
      kvBlocksFree: s.kvBlocksFree,
      prefixCacheQueries: s.prefixCacheQueries,
      prefixCacheHits: s.prefixCacheHits,
      promptTokens: s.promptTokens,
      generationTokens: s.generationTokens,
      preemptions: s.preemptions,
      requestsFinished: s.requestsFinished,
      steps: s.steps,
      encoderRuns: s.encoderRuns,
      encoderCacheQueries: s.encoderCacheQueries,
      encoderCacheHits: s.encoderCacheHits,
      encoderCacheTokens: s.encoderCacheTokens,
      encoderCacheItems: s.encoderCacheItems,
      processorCacheQueries: s.processorCacheQueries,
      processorCacheHits: s.processorCacheHits,
      processorCacheBytes: s.processorCacheBytes,
      processorCacheItems: s.processorCacheItems,
    }
  }

  /**
   * Stop the engine and free the model. Requests still running end with a
   * ClosedError; later calls throw one. Safe to call twice.
   */
  close(): Promise<void> {
    this.#closed = true
    this.#closing ??= this.#native.close()
    return this.#closing
  }

  /** {@link Engine.close}, for `await using engine = await Engine.load(...)`. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close()
  }
}

function checkTokenIds(tokenIds: unknown): asserts tokenIds is number[] {
  if (!Array.isArray(tokenIds) || !tokenIds.every((t) => Number.isInteger(t) && t >= 0)) {
    throw new ValidationError('tokenIds must be an array of non-negative integers')
  }
}
