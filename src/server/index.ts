/**
 * The OpenAI-compatible HTTP server (`candela serve`), as a library:
 *
 * ```ts
 * import { startServer } from '@candela-ai/candela/server'
 * const server = await startServer({ load: { model: 'path/to/model' }, port: 8000 })
 * await server.ready   // the model is loaded; /health answers 200
 * ```
 *
 * @module
 */

export { startServer, DEFAULT_KEEP_ALIVE_MS, DEFAULT_LIMIT_MM_PER_PROMPT, DEFAULT_MAX_BODY_BYTES } from './serve.js'
export type { CandelaServer, ServerOptions } from './serve.js'
export type { LaunchSpec, ModelPool } from './model-pool.js'
export type { ModelHost, HostState } from './model-host.js'
export { createLogger } from './log.js'
export type { Logger, LogFields, LoggerOptions } from './log.js'
