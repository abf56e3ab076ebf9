// The `openai-realtime-api` npm client (a fork of OpenAI's reference beta client), unchanged,
// through a relay that translates the retired beta dialect. Under Node it dials with the `ws`
// package and the `OpenAI-Beta: realtime=v1` header, names the retired model it defaults to
// (gpt-4o-realtime-preview-2024-10-01), and sends its flat session.update on connect. A text
// turn, a function-call round trip (the client calls the tool itself), a server-VAD audio turn
// and a cancel (response.cancel + truncate), through the client's own methods.
// Usage: node beta-realtime-api.mjs '{"url": "ws://…/v1/realtime", "apiKey": "…", "wav": "…"}'
import { RealtimeClient } from 'openai-realtime-api';

import { chunks, options, run, say, ServerEvents, wavWithSilence } from './lib.mjs';

const { url, apiKey, wav } = options();

const client = new RealtimeClient({ url, apiKey });
const events = new ServerEvents();
client.realtime.on('server.*', (event) => events.push(event));
client.realtime.on('close', ({ error }) => events.fail(new Error(`the connection closed (error: ${error})`)));

const responseDone = () => events.nextOfType('response.done');
const audioOf = (item) => item.formatted.audio.length; // samples the client assembled

run(async () => {
  await client.connect(); // sends its session.update at once
  await client.waitForSessionCreated();

  say({ kind: 'step', name: 'text' });
  client.updateSession({ modalities: ['text'] });
  let done = responseDone();
  client.sendUserMessageContent([{ type: 'input_text', text: 'Hello there' }]);
  const text = (await done).response;
  const [reply] = client.conversation.getItems().filter((item) => item.role === 'assistant');
  say({ kind: 'text', status: text.status, text: reply.formatted.text });

  say({ kind: 'step', name: 'tool' });
  let called = null;
  client.addTool(
    {
      name: 'get_weather',
      description: 'The weather in a city.',
      parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
    },
    async ({ city }) => {
      called = { city, result: `sunny in ${city}` };
      say({ kind: 'tool', name: 'get_weather', args: { city }, result: called.result });
      return called.result;
    },
  );
  const call = responseDone();
  client.sendUserMessageContent([{ type: 'input_text', text: 'Please get_weather for Paris.' }]);
  await call;
  done = responseDone(); // the client answers the call and asks for the next response itself
  const answer = (await done).response;
  if (!called) throw new Error('the client never called get_weather');
  say({ kind: 'tool_answer', status: answer.status, text: client.conversation.getItems().at(-1).formatted.text });

  say({ kind: 'step', name: 'audio' });
  client.updateSession({
    modalities: ['text', 'audio'],
    turn_detection: { type: 'server_vad', silence_duration_ms: 500 },
  });
  done = responseDone();
  for (const chunk of chunks(wavWithSilence(wav, 1000), 100)) {
    // A copy: the client sends an Int16Array's whole underlying buffer, not just the view.
    const own = chunk.buffer.slice(chunk.byteOffset, chunk.byteOffset + chunk.length);
    client.appendInputAudio(new Int16Array(own));
  }
  const spoken = (await done).response;
  const voice = client.conversation.getItems().filter((item) => item.role === 'assistant').at(-1);
  say({ kind: 'audio', status: spoken.status, samples: audioOf(voice), transcript: voice.formatted.transcript });

  say({ kind: 'step', name: 'cancel' });
  const firstAudio = events.nextOfType('response.audio.delta');
  done = responseDone();
  client.sendUserMessageContent([{ type: 'input_text', text: 'Tell me a long story.' }]);
  const { item_id } = await firstAudio;
  const truncated = events.nextOfType('conversation.item.truncated');
  client.cancelResponse(item_id, 2400); // 100 ms heard
  const cancelled = (await done).response;
  say({ kind: 'cancel', status: cancelled.status, truncated: (await truncated).audio_end_ms });
  client.disconnect();
});
