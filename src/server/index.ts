/**
 * The OpenAI-compatible HTTP server (`candela serve`), as a library:
 *
 * ```ts
 * import { startServer } from '@candela-ai/candela/server'
 * const server = await startServer({ load: { model: 'path/to/model' }, port: 8000 })
 * await server.ready   // the model is loaded; /health answers 200
 * ```
 *
 * or mounted in an Express app of your own:
 *
 * ```ts
 * import { createApp } from 'candela/server'
 * const candela = await createApp({ load: { model: 'path/to/model' } })
 * app.use('/llm', candela.app)   // OpenAI base URL: http://host:port/llm/v1
 * ```
 *
 * @module
 */

export { createApp, startServer, DEFAULT_KEEP_ALIVE_MS, DEFAULT_LIMIT_MM_PER_PROMPT, DEFAULT_MAX_BODY_BYTES } from './serve.js'
export type { AppOptions, CandelaApp, CandelaServer, ServerOptions } from './serve.js'
export type { LaunchSpec, ModelPool } from './model-pool.js'
export type { ModelHost, HostState } from './model-host.js'
export { createLogger } from './log.js'
export type { Logger, LogFields, LoggerOptions } from './log.js'
