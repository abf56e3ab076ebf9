// Microphone capture for the demo page: whatever rate the AudioContext runs at
// (44.1 kHz in headless Chromium, often 48 kHz elsewhere) in, PCM16 24 kHz mono out,
// posted to the page in fixed-size chunks ready for `input_audio_buffer.append`.
//
// The resampler interpolates linearly and carries its fractional read position and
// the previous block's last sample across render quanta, so non-integer ratios
// (44100 / 24000) stay seamless. The page puts a low-pass BiquadFilterNode in front
// of this node, so what it decimates has no content above the new Nyquist.

class Pcm16Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { targetRate = 24000, chunkSamples = 960 } = options.processorOptions || {};
    this.step = sampleRate / targetRate; // input samples per output sample
    this.pos = 0; // read position in the current block; -1 means the previous block's last sample
    this.prev = 0;
    this.chunkSamples = chunkSamples;
    this.out = new Int16Array(chunkSamples);
    this.n = 0;
    this.sumSquares = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    const len = channels[0].length;
    let mono = channels[0];
    if (channels.length > 1) {
      mono = new Float32Array(len);
      for (const ch of channels) for (let i = 0; i < len; i++) mono[i] += ch[i] / channels.length;
    }
    let pos = this.pos;
    while (pos < len - 1) {
      const i = Math.floor(pos);
      const a = i < 0 ? this.prev : mono[i];
      const b = mono[i + 1];
      let v = a + (b - a) * (pos - i);
      v = v > 1 ? 1 : v < -1 ? -1 : v;
      this.sumSquares += v * v;
      this.out[this.n++] = v < 0 ? v * 0x8000 : v * 0x7fff;
      if (this.n === this.chunkSamples) this.flush();
      pos += this.step;
    }
    this.pos = pos - len;
    this.prev = mono[len - 1];
    return true;
  }

  flush() {
    const level = Math.sqrt(this.sumSquares / this.n);
    this.port.postMessage({ pcm: this.out.buffer, level }, [this.out.buffer]);
    this.out = new Int16Array(this.chunkSamples);
    this.n = 0;
    this.sumSquares = 0;
  }
}

registerProcessor("pcm16-capture", Pcm16Capture);
