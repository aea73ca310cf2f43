// The candela playground: chat (streamed) with any hosted model, launch and
// terminate models, and watch the engine's figures. It only talks to the
// server's own API (/v1/*, /metrics), with the API key as a bearer token.

const $ = (sel) => document.querySelector(sel)
const KEY_STORE = 'candela.apiKey'
const POLL_MS = 2000
const CHART_POINTS = 60

const state = {
  apiKey: sessionStorage.getItem(KEY_STORE) ?? '',
  /** The conversation as sent to the server (OpenAI messages). */
  messages: [],
  /** Files waiting to go with the next message: { kind, name, url }. */
  attachments: [],
  /** The reply being streamed, to stop it. */
  inFlight: undefined,
  /** The model list last drawn (JSON). */
  instances: '',
}

class HttpError extends Error {
  constructor(status, message) {
    super(message)
    this.status = status
  }
}

/** fetch against the server with the key; a non-2xx answer throws with the server's own message. */
async function api(path, init = {}) {
  const headers = new Headers(init.headers)
  if (state.apiKey) headers.set('Authorization', `Bearer ${state.apiKey}`)
  const res = await fetch(path, { ...init, headers })
  if (res.status === 401) askForKey(state.apiKey ? 'the server refused this key' : '')
  if (!res.ok) {
    let message = `${res.status} ${res.statusText}`
    try {
      message = (await res.json()).error?.message ?? message
    } catch {
      // not JSON: keep the status line
    }
    throw new HttpError(res.status, message)
  }
  return res
}

// ---- API key --------------------------------------------------------------

function askForKey(why) {
  $('#key-form').hidden = false
  $('#key-error').textContent = why
  $('#server-status').textContent = 'this server needs an API key'
}

$('#key-form').addEventListener('submit', (ev) => {
  ev.preventDefault()
  state.apiKey = $('#api-key').value.trim()
  sessionStorage.setItem(KEY_STORE, state.apiKey)
  $('#key-error').textContent = ''
  void refreshInstances()
})

// ---- Models: list, pick, launch, terminate ------------------------------------

async function refreshInstances() {
  let list
  try {
    list = (await (await api('/v1/instances')).json()).data
  } catch (err) {
    if (err.status !== 401) $('#server-status').textContent = `cannot list models: ${err.message}`
    return
  }
  $('#key-form').hidden = true
  $('#server-status').textContent = `${list.length} model${list.length === 1 ? '' : 's'}`
  // Redraw only on a change: a button under the pointer is not replaced mid-click.
  const seen = JSON.stringify(list)
  if (seen === state.instances) return
  state.instances = seen
  renderInstances(list)
  renderPicker(list)
}

function statusText(inst) {
  const d = inst.download
  if (inst.status === 'downloading' && d?.total_bytes > 0) return `downloading ${Math.floor((100 * d.downloaded_bytes) / d.total_bytes)}%`
  const w = inst.load
  if (inst.status === 'loading' && w?.total_parameters > 0) return `loading ${Math.floor((100 * w.loaded_parameters) / w.total_parameters)}%`
  if (inst.status === 'failed') return `failed: ${inst.error ?? ''}`
  return inst.status
}

function renderInstances(list) {
  const body = $('#instances tbody')
  body.replaceChildren(
    ...list.map((inst) => {
      const row = document.createElement('tr')
      row.dataset.uid = inst.uid
      const uid = document.createElement('td')
      uid.textContent = inst.uid
      uid.title = [inst.model, inst.architecture, inst.device, inst.max_model_len && `max_model_len ${inst.max_model_len}`].filter(Boolean).join(' · ')
      const status = document.createElement('td')
      status.className = `status ${inst.status}`
      status.textContent = statusText(inst)
      const actions = document.createElement('td')
      const stop = document.createElement('button')
      stop.type = 'button'
      stop.className = 'terminate'
      stop.textContent = 'Terminate'
      stop.addEventListener('click', () => terminate(inst.uid, stop))
      actions.append(stop)
      row.append(uid, status, actions)
      return row
    }),
  )
}

/** The picker offers every hosted model by its first served name; the choice survives refreshes. */
function renderPicker(list) {
  const picker = $('#model-picker')
  const chosen = picker.value
  picker.replaceChildren(
    ...list.map((inst) => {
      const name = inst.served_model_names[0]
      const opt = new Option(inst.status === 'ready' ? name : `${name} (${statusText(inst)})`, name)
      opt.disabled = inst.status !== 'ready'
      return opt
    }),
  )
  const names = list.map((i) => i.served_model_names[0])
  if (names.includes(chosen)) picker.value = chosen
  else picker.value = list.find((i) => i.status === 'ready')?.served_model_names[0] ?? ''
}

async function terminate(uid, button) {
  button.disabled = true
  try {
    await api(`/v1/instances/${encodeURIComponent(uid)}`, { method: 'DELETE' })
  } catch (err) {
    alert(`terminate ${uid}: ${err.message}`)
  }
  await refreshInstances()
}

/** The launch form -> POST /v1/instances (the route's field names; empty fields are left out). */
function launchBody(form) {
  const data = new FormData(form)
  const body = {}
  for (const key of ['model', 'uid', 'format', 'quantization', 'limit_mm_per_prompt', 'kv_cache_memory', 'device', 'dtype']) {
    const v = String(data.get(key) ?? '').trim()
    if (v !== '') body[key] = v
  }
  const len = String(data.get('max_model_len') ?? '').trim()
  if (len !== '') body.max_model_len = Number(len)
  const extra = String(data.get('extra') ?? '').trim()
  if (extra !== '') {
    let parsed
    try {
      parsed = JSON.parse(extra)
    } catch {
      throw new Error('other options must be a JSON object, e.g. {"max_num_seqs": 8}')
    }
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw new Error('other options must be a JSON object')
    Object.assign(body, parsed)
  }
  return body
}

$('#launch').addEventListener('submit', async (ev) => {
  ev.preventDefault()
  const form = ev.currentTarget
  const error = $('#launch-error')
  error.textContent = ''
  try {
    const res = await api('/v1/instances', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(launchBody(form)),
    })
    const inst = await res.json()
    error.textContent = ''
    form.reset()
    await refreshInstances()
    // Chat with the new model once it is ready.
    const picker = $('#model-picker')
    const wanted = inst.served_model_names[0]
    const pick = () => {
      const opt = [...picker.options].find((o) => o.value === wanted)
      if (opt && !opt.disabled) picker.value = wanted
      return opt === undefined || !opt.disabled
    }
    if (!pick()) {
      const timer = setInterval(() => pick() && clearInterval(timer), POLL_MS / 2)
    }
  } catch (err) {
    error.textContent = err.message
  }
})

// ---- Attachments: upload, paste, drop ------------------------------------------

function kindOf(file) {
  const kind = file.type.split('/')[0]
  return ['image', 'audio', 'video'].includes(kind) ? kind : undefined
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader()
    reader.onload = () => resolve(reader.result)
    reader.onerror = () => reject(reader.error)
    reader.readAsDataURL(file)
  })
}

async function attach(files) {
  for (const file of files) {
    const kind = kindOf(file)
    if (!kind) {
      alert(`${file.name || 'this file'}: only images, audio and video can be attached`)
      continue
    }
    state.attachments.push({ kind, name: file.name || `pasted ${kind}`, url: await readAsDataUrl(file) })
  }
  renderAttachments()
}

function mediaElement(kind, url) {
  const el = document.createElement(kind === 'image' ? 'img' : kind)
  el.src = url
  if (kind !== 'image') el.controls = true
  return el
}

function renderAttachments() {
  $('#attachments').replaceChildren(
    ...state.attachments.map((a, i) => {
      const chip = document.createElement('figure')
      chip.className = 'attachment'
      const remove = document.createElement('button')
      remove.type = 'button'
      remove.textContent = '×'
      remove.title = `remove ${a.name}`
      remove.addEventListener('click', () => {
        state.attachments.splice(i, 1)
        renderAttachments()
      })
      const caption = document.createElement('figcaption')
      caption.textContent = a.name
      chip.append(mediaElement(a.kind, a.url), caption, remove)
      return chip
    }),
  )
}

$('#file-input').addEventListener('change', async (ev) => {
  await attach([...ev.target.files])
  ev.target.value = ''
})
$('#prompt').addEventListener('paste', (ev) => {
  const files = [...(ev.clipboardData?.files ?? [])]
  if (files.length > 0) {
    ev.preventDefault()
    void attach(files)
  }
})
$('#chat').addEventListener('dragover', (ev) => ev.preventDefault())
$('#chat').addEventListener('drop', (ev) => {
  ev.preventDefault()
  void attach([...(ev.dataTransfer?.files ?? [])])
})

/** An attachment as an OpenAI content part (data: URLs; the server decodes them). */
function contentPart(a) {
  if (a.kind === 'image') return { type: 'image_url', image_url: { url: a.url } }
  if (a.kind === 'audio') return { type: 'audio_url', audio_url: { url: a.url } }
  return { type: 'video_url', video_url: { url: a.url } }
}

// ---- Chat -----------------------------------------------------------------------

function addBubble(role) {
  const li = document.createElement('li')
  li.className = `message ${role}`
  const media = document.createElement('div')
  media.className = 'media'
  const text = document.createElement('div')
  text.className = 'text'
  const meta = document.createElement('div')
  meta.className = 'meta'
  li.append(media, text, meta)
  $('#messages').append(li)
  return li
}

function samplingParams() {
  const data = new FormData($('#sampling'))
  const params = {}
  for (const key of ['temperature', 'top_p', 'top_k', 'max_tokens', 'seed']) {
    const v = String(data.get(key) ?? '').trim()
    if (v !== '') params[key] = Number(v)
  }
  return { params, system: String(data.get('system') ?? '').trim() }
}

/** Server-sent events of a chat completion: yields each parsed `data:` payload until [DONE]. */
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader()
  let buffer = ''
  for (;;) {
    const { value, done } = await reader.read()
    if (done) return
    buffer += value
    let end
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const event = buffer.slice(0, end)
      buffer = buffer.slice(end + 2)
      const data = event
        .split('\n')
        .filter((l) => l.startsWith('data:'))
        .map((l) => l.slice(5).trimStart())
        .join('\n')
      if (data === '') continue
      if (data === '[DONE]') return
      yield JSON.parse(data)
    }
  }
}

async function send() {
  const text = $('#prompt').value.trim()
  const model = $('#model-picker').value
  if ((text === '' && state.attachments.length === 0) || state.inFlight) return
  if (!model) {
    alert('no model is ready: launch one first')
    return
  }
  const parts = [...state.attachments.map(contentPart), ...(text ? [{ type: 'text', text }] : [])]
  const userBubble = addBubble('user')
  for (const a of state.attachments) userBubble.querySelector('.media').append(mediaElement(a.kind, a.url))
  userBubble.querySelector('.text').textContent = text
  // "New chat" while this streams starts another array: the reply lands in its own conversation.
  const conversation = state.messages
  conversation.push({ role: 'user', content: state.attachments.length > 0 ? parts : text })
  state.attachments = []
  renderAttachments()
  $('#prompt').value = ''

  const { params, system } = samplingParams()
  const bubble = addBubble('assistant')
  bubble.dataset.model = model
  bubble.dataset.state = 'streaming'
  const out = bubble.querySelector('.text')
  const controller = new AbortController()
  state.inFlight = controller
  $('#send').hidden = true
  $('#stop').hidden = false
  let reply = ''
  let chunks = 0
  const started = performance.now()
  let firstToken
  try {
    const res = await api('/v1/chat/completions', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      signal: controller.signal,
      body: JSON.stringify({
        model,
        messages: system ? [{ role: 'system', content: system }, ...conversation] : conversation,
        stream: true,
        stream_options: { include_usage: true },
        ...params,
      }),
    })
    let usage
    for await (const ev of sseEvents(res.body)) {
      if (ev.error) throw new Error(ev.error.message)
      const delta = ev.choices?.[0]?.delta?.content
      if (delta) {
        firstToken ??= performance.now()
        reply += delta
        chunks += 1
        bubble.dataset.chunks = String(chunks)
        out.textContent = reply
        out.scrollIntoView({ block: 'end' })
      }
      if (ev.usage) usage = ev.usage
    }
    if (usage) {
      const secs = (performance.now() - (firstToken ?? started)) / 1000
      const rate = usage.completion_tokens > 1 && secs > 0 ? ` · ${((usage.completion_tokens - 1) / secs).toFixed(1)} tok/s` : ''
      bubble.querySelector('.meta').textContent = `${model} · ${usage.prompt_tokens} prompt + ${usage.completion_tokens} tokens${rate}`
    }
    bubble.dataset.state = 'done'
  } catch (err) {
    bubble.dataset.state = controller.signal.aborted ? 'stopped' : 'error'
    if (!controller.signal.aborted) {
      const error = document.createElement('div')
      error.className = 'error'
      error.textContent = err.message
      bubble.append(error)
    }
  } finally {
    state.inFlight = undefined
    $('#send').hidden = false
    $('#stop').hidden = true
  }
  // A stopped or failed reply stays in the conversation as far as it got.
  if (reply !== '') {
    conversation.push({ role: 'assistant', content: reply })
  } else {
    conversation.pop()
    userBubble.classList.add('unsent')
    userBubble.title = 'not part of the conversation: it got no answer'
  }
}

$('#composer').addEventListener('submit', (ev) => {
  ev.preventDefault()
  void send()
})
$('#prompt').addEventListener('keydown', (ev) => {
  if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault()
    void send()
  }
})
$('#stop').addEventListener('click', () => state.inFlight?.abort())
$('#clear-chat').addEventListener('click', () => {
  state.inFlight?.abort()
  state.messages = []
  $('#messages').replaceChildren()
})

// ---- Engine figures from /metrics ------------------------------------------

/** Prometheus text -> { name: value }, summing a family's labelled samples. */
function parseMetrics(text) {
  const values = {}
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})? (\S+)/.exec(line)
    if (m) values[m[1]] = (values[m[1]] ?? 0) + Number(m[2])
  }
  return values
}

const ratio = (hits, queries) => (queries > 0 ? hits / queries : 0)
const percent = (v) => `${(100 * v).toFixed(0)}%`

/** Each chart: its title, how to read a value off one scrape (and the one before), how to print it. */
const CHARTS = [
  { id: 'running', title: 'running / waiting', series: [(m) => m.candela_requests_running ?? 0, (m) => m.candela_requests_waiting ?? 0], format: (v) => v.map(String).join(' / ') },
  { id: 'kv', title: 'KV cache usage', series: [(m) => m.candela_kv_cache_usage_ratio ?? 0], format: (v) => percent(v[0]), max: 1 },
  { id: 'prefix', title: 'prefix cache hit rate', series: [(m) => ratio(m.candela_prefix_cache_hits_total, m.candela_prefix_cache_queries_total)], format: (v) => percent(v[0]), max: 1 },
  { id: 'encoder', title: 'encoder cache hit rate', series: [(m) => ratio(m.candela_encoder_cache_hits_total, m.candela_encoder_cache_queries_total)], format: (v) => percent(v[0]), max: 1 },
  {
    id: 'tokens',
    title: 'generated tokens/s',
    series: [(m, prev, dt) => (prev && dt > 0 ? Math.max(0, (m.candela_generation_tokens_total ?? 0) - (prev.candela_generation_tokens_total ?? 0)) / dt : 0)],
    format: (v) => v[0].toFixed(1),
  },
]
const COLORS = ['#2563eb', '#d97706']
const recent = new Map(CHARTS.map((c) => [c.id, []]))
let previous

function setupCharts() {
  $('#charts').replaceChildren(
    ...CHARTS.map((c) => {
      const fig = document.createElement('figure')
      fig.className = 'chart'
      fig.dataset.chart = c.id
      fig.innerHTML = `<figcaption><span></span><output></output></figcaption><svg viewBox="0 0 ${CHART_POINTS - 1} 30" preserveAspectRatio="none"></svg>`
      fig.querySelector('span').textContent = c.title
      return fig
    }),
  )
}

function drawChart(c, points) {
  const fig = document.querySelector(`[data-chart="${c.id}"]`)
  const top = Math.max(c.max ?? 0, ...points.flat(), 1e-9)
  const svg = fig.querySelector('svg')
  svg.replaceChildren(
    ...c.series.map((_, s) => {
      const line = document.createElementNS('http://www.w3.org/2000/svg', 'polyline')
      const offset = CHART_POINTS - points.length
      line.setAttribute('points', points.map((p, i) => `${offset + i},${(30 - (28 * p[s]) / top - 1).toFixed(2)}`).join(' '))
      line.setAttribute('stroke', COLORS[s])
      line.setAttribute('fill', 'none')
      line.setAttribute('vector-effect', 'non-scaling-stroke')
      return line
    }),
  )
  const last = points.at(-1)
  fig.querySelector('output').textContent = last ? c.format(last) : ''
}

async function refreshMetrics() {
  let now
  try {
    now = { at: performance.now(), values: parseMetrics(await (await api('/metrics')).text()) }
  } catch {
    return
  }
  const dt = previous ? (now.at - previous.at) / 1000 : 0
  for (const c of CHARTS) {
    const points = recent.get(c.id)
    points.push(c.series.map((f) => f(now.values, previous?.values, dt)))
    if (points.length > CHART_POINTS) points.shift()
    drawChart(c, points)
  }
  previous = now
}

setupCharts()
if (state.apiKey) $('#api-key').value = state.apiKey
void refreshInstances()
void refreshMetrics()
setInterval(() => {
  if ($('#key-form').hidden) void refreshInstances()
  void refreshMetrics()
}, POLL_MS)
