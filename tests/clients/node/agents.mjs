// The JS Agents SDK (@openai/agents-realtime), as its docs show it, through a relay:
// RealtimeSession over the WebSocket transport, connect({ url, apiKey }), a tool defined with
// tool(), a text turn, a tool round trip, a server-VAD audio turn, and interrupt().
// Usage: node agents.mjs '{"url": "ws://…/v1/realtime?model=…", "apiKey": "…", "wav": "…"}'
import { RealtimeAgent, RealtimeSession, tool } from '@openai/agents-realtime';
import { z } from 'zod';

import { chunks, options, run, say, ServerEvents, wavWithSilence } from './lib.mjs';

const { url, apiKey, wav, instructions } = options();

let toolCalled;
const toolCall = new Promise((resolve) => { toolCalled = resolve; });
const getWeather = tool({
  name: 'get_weather',
  description: 'The weather in a city.',
  parameters: z.object({ city: z.string() }),
  async execute({ city }) {
    const result = `sunny in ${city}`;
    say({ kind: 'tool', name: 'get_weather', args: { city }, result });
    toolCalled();
    return result;
  },
});

const agent = new RealtimeAgent({ name: 'Assistant', instructions, tools: [getWeather] });
const session = new RealtimeSession(agent, {
  transport: 'websocket',
  config: {
    audio: { input: { turnDetection: { type: 'server_vad', silenceDurationMs: 500 } } },
  },
});
const events = new ServerEvents();
session.on('transport_event', (event) => {
  // Every server event the SDK received, as it received it (its own events are left out).
  if (event.type !== 'connection_change' && !String(event.type).startsWith('turn_')) {
    events.push(event);
  }
});
session.on('error', (error) => say({ kind: 'sdk_error', error: JSON.stringify(error?.error ?? String(error)) }));
session.transport.on('connection_change', (status) => {
  if (status === 'disconnected') events.fail(new Error('the connection closed'));
});

const responseDone = () => events.nextOfType('response.done');

run(async () => {
  const created = events.nextOfType('session.created');
  await session.connect({ url, apiKey });
  await created;

  say({ kind: 'step', name: 'text' });
  let done = responseDone();
  session.sendMessage('Hello!');
  await done;

  say({ kind: 'step', name: 'tool' });
  session.sendMessage('What is the weather in Paris? Use get_weather.');
  await Promise.race([
    toolCall,
    events
      .next((e) => e.type === 'response.done' && !e.response.output.some((i) => i.type === 'function_call'), 'an answer')
      .then(() => { throw new Error('the model answered without calling get_weather'); }),
  ]);
  // The SDK sends the tool's output and asks for the answer that uses it.
  await events.next(
    (e) => e.type === 'response.done' && e.response.output.some((item) => item.type === 'message'),
    'the answer after the tool call',
  );

  say({ kind: 'step', name: 'audio' });
  done = responseDone();
  for (const chunk of chunks(wavWithSilence(wav, 1000))) {
    session.sendAudio(chunk.buffer.slice(chunk.byteOffset, chunk.byteOffset + chunk.byteLength));
  }
  await done;

  say({ kind: 'step', name: 'interrupt' });
  const firstAudio = events.nextOfType('response.output_audio.delta');
  done = responseDone();
  session.sendMessage('Tell me a long story.');
  await firstAudio;
  session.interrupt();
  await done;
  session.close();
});
