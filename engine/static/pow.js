// The results page's proof-of-work solver (engine/challenge.py says the format): find
// decimal digits S such that SHA-256(challenge + "." + S) starts with `difficultyBits` zero
// bits. WebCrypto's SHA-256 (every browser has it, nothing to download or build); digests
// are asked for BATCH at a time, because one promise per hash would spend most of the time
// waiting on the event loop rather than hashing. Bounded: at most HASHES_MAX tries (the
// engine's difficulty is at most 32 bits, far beyond what a page should ever be asked).
"use strict";
(function () {
  const BATCH = 512;
  const HASHES_MAX = 1 << 28;
  const encoder = new TextEncoder();

  function leadingZeroBits(bytes) {
    let bits = 0;
    for (const byte of bytes) {
      if (byte === 0) { bits += 8; continue; }
      return bits + Math.clz32(byte) - 24;
    }
    return bits;
  }

  async function solve(challenge, difficultyBits) {
    if (difficultyBits <= 0) return "0";
    const prefix = challenge + ".";
    for (let first = 0; first < HASHES_MAX; first += BATCH) {
      const digests = [];
      for (let n = first; n < first + BATCH; n++) {
        digests.push(crypto.subtle.digest("SHA-256", encoder.encode(prefix + n)));
      }
      const results = await Promise.all(digests);
      for (let i = 0; i < results.length; i++) {
        if (leadingZeroBits(new Uint8Array(results[i])) >= difficultyBits) {
          return String(first + i);
        }
      }
    }
    throw new Error("no solution within " + HASHES_MAX + " tries");
  }

  window.votesPow = { solve, leadingZeroBits };
})();
