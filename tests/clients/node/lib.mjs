// What the client scripts share: their options, the JSON lines they print, the server events
// they wait for, and the test audio. Nothing here touches the SDKs themselves.
import { readFileSync } from 'node:fs';

/** The options the test passes as one JSON argument. */
export function options() {
  return JSON.parse(process.argv[2]);
}

/** One JSON line on stdout: what the client saw or did. */
export function say(record) {
  process.stdout.write(JSON.stringify(record) + '\n');
}

/** An event as printed: audio payloads are replaced by their length. */
function brief(event) {
  if (typeof event.delta === 'string' && event.type === 'response.output_audio.delta') {
    return { ...event, delta: event.delta.length };
  }
  return event;
}

/** The server events a client received, in order, and waiting for the next that matches. */
export class ServerEvents {
  constructor() {
    this.waiters = [];
    this.failure = null;
  }

  /** The connection is gone: every wait, now and later, fails with `error`. */
  fail(error) {
    this.failure ??= error;
    for (const waiter of this.waiters) waiter.reject(this.failure);
    this.waiters = [];
  }

  push(event) {
    say({ kind: 'server', event: brief(event) });
    this.waiters = this.waiters.filter((waiter) => {
      if (!waiter.match(event)) return true;
      waiter.resolve(event);
      return false;
    });
  }

  /** The next event (from now on) that `match` accepts; rejects after `ms`. */
  next(match, what, ms = 20000) {
    return new Promise((resolve, reject) => {
      if (this.failure) {
        reject(this.failure);
        return;
      }
      const timer = setTimeout(() => reject(new Error(`no ${what} within ${ms} ms`)), ms);
      this.waiters.push({
        match,
        resolve: (event) => {
          clearTimeout(timer);
          resolve(event);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      });
    });
  }

  /** The next event of `type`. */
  nextOfType(type, ms) {
    return this.next((event) => event.type === type, type, ms);
  }
}

/** The PCM16 samples of a WAV file, followed by `silenceMs` of silence (so server VAD ends the turn). */
export function wavWithSilence(path, silenceMs) {
  const file = readFileSync(path);
  let offset = 12;
  while (offset + 8 <= file.length) {
    const id = file.toString('ascii', offset, offset + 4);
    const size = file.readUInt32LE(offset + 4);
    if (id === 'data') {
      const silence = Buffer.alloc((24000 * 2 * silenceMs) / 1000);
      return Buffer.concat([file.subarray(offset + 8, offset + 8 + size), silence]);
    }
    offset += 8 + size + (size % 2);
  }
  throw new Error(`${path}: no data chunk`);
}

/** `pcm` in chunks of `ms` milliseconds (PCM16, 24 kHz), as a microphone would deliver it. */
export function* chunks(pcm, ms = 40) {
  const size = (24000 * 2 * ms) / 1000;
  for (let start = 0; start < pcm.length; start += size) {
    yield pcm.subarray(start, start + size);
  }
}

/** Run `main`, print a last `end` (or `failed`) line, and exit; give up after `ms`. */
export async function run(main, ms = 60000) {
  const timer = setTimeout(() => {
    say({ kind: 'failed', error: `the scenario did not finish within ${ms} ms` });
    process.exit(1);
  }, ms);
  try {
    await main();
    say({ kind: 'end' });
    process.exitCode = 0;
  } catch (error) {
    say({ kind: 'failed', error: String(error?.stack ?? error) });
    process.exitCode = 1;
  } finally {
    clearTimeout(timer);
  }
  // Sockets the SDK may keep open would keep Node alive.
  setTimeout(() => process.exit(process.exitCode), 200).unref();
}
