// The openai npm package's Realtime WebSocket client (OpenAIRealtimeWS), as its docs show it,
// through a relay. It always dials wss:, so the relay serves TLS (relay demo --tls) and Node
// trusts its CA through NODE_EXTRA_CA_CERTS. A text turn, a function-tool round trip, a
// server-VAD audio turn, and an interrupt (truncate + cancel), written out by hand.
// Usage: node openai-ws.mjs '{"baseURL": "https://…/v1", "apiKey": "…", "model": "…", "wav": "…"}'
import OpenAI from 'openai';
import { OpenAIRealtimeWS } from 'openai/realtime/ws';

import { chunks, options, run, say, ServerEvents, wavWithSilence } from './lib.mjs';

const { baseURL, apiKey, model, wav, instructions } = options();

const client = new OpenAI({ apiKey, baseURL });
const rt = new OpenAIRealtimeWS({ model }, client);
const events = new ServerEvents();
rt.on('event', (event) => events.push(event));
rt.on('error', (error) => say({ kind: 'sdk_error', error: String(error?.message ?? error) }));
rt.socket.on('error', (error) => events.fail(error));
rt.socket.on('close', (code) => events.fail(new Error(`the connection closed (${code})`)));

const getWeather = {
  type: 'function',
  name: 'get_weather',
  description: 'The weather in a city.',
  parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
};
const responseDone = () => events.nextOfType('response.done');
const say_ = (text) => {
  rt.send({
    type: 'conversation.item.create',
    item: { type: 'message', role: 'user', content: [{ type: 'input_text', text }] },
  });
  rt.send({ type: 'response.create' });
};

run(async () => {
  await events.nextOfType('session.created');
  const updated = events.nextOfType('session.updated');
  rt.send({
    type: 'session.update',
    session: {
      type: 'realtime',
      instructions,
      tools: [getWeather],
      audio: { input: { turn_detection: { type: 'server_vad', silence_duration_ms: 500 } } },
    },
  });
  await updated;

  say({ kind: 'step', name: 'text' });
  let done = responseDone();
  say_('Hello!');
  await done;

  say({ kind: 'step', name: 'tool' });
  done = responseDone();
  say_('What is the weather in Paris? Use get_weather.');
  const call = (await done).response.output.find((item) => item.type === 'function_call');
  if (!call) throw new Error('the model did not call get_weather');
  const { city } = JSON.parse(call.arguments);
  const result = `sunny in ${city}`;
  say({ kind: 'tool', name: call.name, args: { city }, result });
  done = responseDone();
  rt.send({
    type: 'conversation.item.create',
    item: { type: 'function_call_output', call_id: call.call_id, output: result },
  });
  rt.send({ type: 'response.create' });
  await done;

  say({ kind: 'step', name: 'audio' });
  done = responseDone();
  for (const chunk of chunks(wavWithSilence(wav, 1000))) {
    rt.send({ type: 'input_audio_buffer.append', audio: chunk.toString('base64') });
  }
  await done;

  say({ kind: 'step', name: 'interrupt' });
  const firstAudio = events.nextOfType('response.output_audio.delta');
  done = responseDone();
  say_('Tell me a long story.');
  const delta = await firstAudio;
  // As a player would: the audio heard so far (here the first chunk, PCM16 at 24 kHz).
  const heardMs = Math.floor(Buffer.from(delta.delta, 'base64').length / 48);
  rt.send({
    type: 'conversation.item.truncate', item_id: delta.item_id, content_index: 0, audio_end_ms: heardMs,
  });
  rt.send({ type: 'response.cancel' });
  await done;
  rt.close();
});
