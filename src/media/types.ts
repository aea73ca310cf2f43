/** Media kinds a prompt can carry. */
export type Modality = 'image' | 'video' | 'audio'

export const MODALITIES: readonly Modality[] = ['image', 'video', 'audio']

/** Raw audio as vLLM's `(array, sampling_rate)`: one array, or one per channel. */
export interface AudioSamples {
  samples: Float32Array | Float32Array[]
  sampleRate: number
}

/** One media item ready for the native layer, in prompt order. */
export interface ResolvedMedia {
  modality: Modality
  data?: Buffer
  /** A video given as its frames (encoded images). */
  frames?: Buffer[]
  /** Image / video processor options (snake_case, as the model's processor names them). */
  kwargs?: Record<string, unknown>
  samples?: Float32Array[]
  sampleRate?: number
  format?: string
  uuid?: string
  /** Precomputed embeddings, row-major, with their [tokens, hidden] shape. */
  embeds?: Float32Array
  embedsShape?: number[]
  /** Precomputed embeddings as a torch.save archive, .npy file or safetensors blob. */
  embedsBlob?: Buffer
  /** The image grid as its own such blob (vLLM's dict form). */
  gridBlob?: Buffer
  /** The embeddings' (t, h, w) patch grid. */
  gridThw?: number[]
  /** A URL item left unfetched because it has a uuid: fetches it. */
  load?: () => Promise<ResolvedMedia>
}
