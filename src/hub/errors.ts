/** Why a model could not be had from the hub, with the repo named in the message. */

import { CandelaError } from '../errors.js'

export type HubErrorCode =
  /** 401/403: gated or private, and no token (or one without access). */
  | 'gated'
  /** 404: no such repo, revision or file. */
  | 'not_found'
  /** HF_HUB_OFFLINE is set and the cache lacks the files. */
  | 'offline'
  /** The hub could not be reached or answered something unexpected. */
  | 'network'
  /** A downloaded file does not match its sha256 / ETag. */
  | 'checksum'

export class HubError extends CandelaError {
  override name = 'HubError'
  declare readonly code: HubErrorCode
  constructor(
    code: HubErrorCode,
    message: string,
    /** The HTTP status behind the error, when there was one. */
    readonly status?: number,
  ) {
    super(message, { code, param: 'model' })
  }
}

/** The error a hub response stands for (its `X-Error-Code` refines the status, as huggingface_hub reads it). */
export function fromResponse(res: Response, repo: string, what: string, endpoint: string, tokenSent: boolean): HubError {
  const code = res.headers.get('x-error-code')
  const detail = res.headers.get('x-error-message')
  const tail = detail ? ` (${detail})` : ''
  const login = tokenSent ? 'the token in HF_TOKEN has no access to it' : 'set HF_TOKEN to a token that has access'
  if (code === 'GatedRepo') {
    return new HubError('gated', `${repo} is a gated repo on ${endpoint}: accept its terms on the hub, and ${login}${tail}`, res.status)
  }
  if (code === 'RevisionNotFound') return new HubError('not_found', `${repo} has no revision ${what}${tail}`, res.status)
  if (code === 'EntryNotFound') return new HubError('not_found', `${repo} has no file ${what}${tail}`, res.status)
  if (code === 'RepoNotFound' || res.status === 404) {
    return new HubError('not_found', `repository ${repo} not found on ${endpoint} (if it is private, ${login})${tail}`, res.status)
  }
  if (res.status === 401 || res.status === 403) {
    return new HubError('gated', `access to ${repo} on ${endpoint} was refused (${res.status}): it is gated or private; ${login}${tail}`, res.status)
  }
  return new HubError('network', `${endpoint} answered ${res.status} ${res.statusText} for ${repo} ${what}${tail}`, res.status)
}
