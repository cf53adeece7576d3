// The last few minutes of snapshots, per topic and summed, for the charts.  Fed with every
// snapshot whatever page is shown, so a topic page opened later already has a history.

export const CAPACITY = 120; // snapshots (one a second)

export const SERIES = ["in", "out", "p50", "p95", "p99"];

function topicKey(queue, topic) {
  return `${queue}\u0000${topic}`;
}

export class History {
  constructor(capacity = CAPACITY) {
    this.capacity = capacity;
    this.times = [];
    this.total = { in: [], out: [] };
    this.topics = new Map(); // key -> {in, out, p50, p95, p99}: arrays aligned with times
    this.lastGenerated = null;
  }

  /** Add one snapshot; false when it was already seen (same generated_at). */
  add(snapshot) {
    if (snapshot.generated_at === null || snapshot.generated_at === this.lastGenerated) {
      return false;
    }
    this.lastGenerated = snapshot.generated_at;
    const overflow = this.times.length >= this.capacity;
    const push = (array, value) => {
      array.push(value);
      if (overflow) array.shift();
    };
    push(this.times, snapshot.generated_at);
    let totalIn = 0;
    let totalOut = 0;
    const seen = new Set();
    for (const queue of snapshot.queues) {
      for (const t of queue.topics) {
        const key = topicKey(t.queue, t.topic);
        seen.add(key);
        let series = this.topics.get(key);
        if (!series) {
          // A topic new to us: pad its past with gaps so every series lines up with times.
          const past = overflow ? this.times.length : this.times.length - 1;
          const gap = () => new Array(past).fill(null);
          series = { in: gap(), out: gap(), p50: gap(), p95: gap(), p99: gap() };
          this.topics.set(key, series);
        }
        push(series.in, t.rates.in_per_second);
        push(series.out, t.rates.out_per_second);
        push(series.p50, t.duration_ms.p50);
        push(series.p95, t.duration_ms.p95);
        push(series.p99, t.duration_ms.p99);
        totalIn += t.rates.in_per_second;
        totalOut += t.rates.out_per_second;
      }
    }
    for (const [key, series] of this.topics) {
      if (seen.has(key)) continue;
      if (series.out.every((v) => v === null)) this.topics.delete(key);
      else for (const name of SERIES) push(series[name], null); // removed topic
    }
    push(this.total.in, totalIn);
    push(this.total.out, totalOut);
    return true;
  }

  topic(queue, topic) {
    return this.topics.get(topicKey(queue, topic)) || null;
  }
}
