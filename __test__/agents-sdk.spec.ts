// The OpenAI Agents SDK (`@openai/agents`) running a two-tool agent against
// `candela serve` on the qwen2-tiny fixture, over the Responses API (the
// SDK's default) and over chat completions. Random weights never call a tool
// on their own: `toolChoice: 'required'` makes the grammar write the first
// turn's calls; the SDK then resets the choice to auto, and the model answers
// in text (noise: the weights are random). One call per turn: the tool-call
// grammar lets JSON whitespace run on, and a random model asked for several
// calls can spend max_tokens inside the array. Tracing is off: nothing leaves
// 127.0.0.1.
import test from 'ava'
import { Agent, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, setTracingDisabled, tool } from '@openai/agents'
import type { Model } from '@openai/agents'
import { z } from 'zod'

import { fixture } from './helpers.js'
import { startTestServer } from './server-helpers.js'
import type { TestServer } from './server-helpers.js'

const MODEL = 'qwen2-tiny'
let t0: TestServer

test.before(async () => {
  setTracingDisabled(true)
  t0 = await startTestServer({ load: { model: fixture('qwen2-tiny') }, servedModelName: MODEL })
})

test.after.always(async () => {
  await t0?.server.close()
})

async function runAgent(model: Model) {
  const calls: Array<{ name: string; args: unknown }> = []
  const weather = tool({
    name: 'get_weather',
    description: 'The weather in a city',
    parameters: z.object({ city: z.string().min(1).max(12) }),
    execute: async (args) => {
      calls.push({ name: 'get_weather', args })
      return `sunny in ${args.city}`
    },
  })
  const add = tool({
    name: 'add',
    description: 'Add two numbers',
    parameters: z.object({ a: z.number().int().min(0).max(99), b: z.number().int().min(0).max(99) }),
    execute: async (args) => {
      calls.push({ name: 'add', args })
      return String(args.a + args.b)
    },
  })
  const agent = new Agent({
    name: 'helper',
    instructions: 'Answer with the tools.',
    model,
    tools: [weather, add],
    // Seeded sampling (vLLM's `seed`, passed through): the run repeats exactly.
    modelSettings: { toolChoice: 'required', parallelToolCalls: false, temperature: 1, maxTokens: 600, providerData: { seed: 1 } },
  })
  const result = await new Runner({ tracingDisabled: true }).run(agent, 'What is the weather in Paris, and what is 2 + 3?', { maxTurns: 4 })
  return { calls, result }
}

for (const [api, make] of [
  ['responses', () => new OpenAIResponsesModel(t0.client, MODEL)],
  ['chat completions', () => new OpenAIChatCompletionsModel(t0.client, MODEL)],
] as const) {
  test.serial(`a two-tool agent (${api}): the forced turn calls a tool with valid arguments, its result goes back, a final answer comes`, async (t) => {
    const { calls, result } = await runAgent(make())
    t.true(calls.length >= 1, `no tool ran: ${JSON.stringify(result.newItems.map((i) => i.toJSON())).slice(0, 800)}`)
    // The SDK parsed each call's arguments with the tool's zod schema before running it.
    for (const c of calls) t.true(['get_weather', 'add'].includes(c.name), JSON.stringify(c))
    const kinds = result.newItems.map((i) => i.type)
    t.true(kinds.includes('tool_call_item'), kinds.join())
    t.true(kinds.includes('tool_call_output_item'), kinds.join())
    // A turn after the tool results: the model answered in text.
    t.true(result.rawResponses.length >= 2, String(result.rawResponses.length))
    t.is(kinds.at(-1), 'message_output_item', kinds.join())
    t.is(typeof result.finalOutput, 'string')
  })
}
