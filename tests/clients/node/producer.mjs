// Producers written the way a Node.js service would write them, with ioredis and node-redis.
// Driven by tests/gateway/test_clients.py:
//
//     node producer.mjs <port> <password> < plan.json
//
// The plan lists runs, each naming a library, the protocol it asks for (node-redis's RESP
// option: null logs in with AUTH, 2 or 3 with HELLO <n> AUTH; ioredis 5 speaks RESP2 with AUTH
// only) and whether it logs in as the queue user or with the password alone, plus the
// payloads (base64, so any bytes travel) and the XADD id to push.  Prints one JSON object on stdout: for each run and step, the JavaScript type and
// value the library returned, or the error it rejected with.

import { Redis as IORedis } from "ioredis";
import { createClient } from "redis";

const STEP_TIMEOUT_MS = 10_000;

if (process.argv.length !== 4) {
  process.stderr.write("usage: node producer.mjs <port> <password> < plan.json\n");
  process.exit(2);
}
const port = Number(process.argv[2]);
const password = process.argv[3];

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks).toString("utf8");
}

const bytes = (b64) => Buffer.from(b64, "base64");

function describe(value) {
  if (value === null) return { type: "null", value: null };
  if (Buffer.isBuffer(value)) return { type: "Buffer", value: value.toString("base64") };
  if (Array.isArray(value)) return { type: "Array", value };
  return { type: typeof value, value };
}

/** Run one client call with a deadline; report its reply or the error it rejected with. */
async function step(call) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`no reply within ${STEP_TIMEOUT_MS} ms`)),
      STEP_TIMEOUT_MS,
    );
  });
  try {
    return describe(await Promise.race([call(), deadline]));
  } catch (error) {
    return { error: error?.constructor?.name ?? "Error", message: String(error?.message ?? error) };
  } finally {
    clearTimeout(timer);
  }
}

/** The library-neutral producer calls, one adapter per library. */
function ioredisProducer(run) {
  const client = new IORedis({
    host: "127.0.0.1",
    port,
    username: run.username ?? undefined,
    password,
    lazyConnect: true,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null, // a refused handshake must fail the run, not loop
    connectTimeout: STEP_TIMEOUT_MS,
  });
  client.on("error", () => {}); // surfaced by the rejected command instead
  return {
    connect: () => client.connect().then(() => client.status),
    lpush: (key, payloads) => client.lpush(key, ...payloads),
    rpush: (key, payloads) => client.rpush(key, ...payloads),
    xadd: (key, id, fields) => client.xadd(key, id, ...Object.entries(fields).flat()),
    llen: (key) => client.llen(key),
    ping: () => client.ping(),
    close: () => client.quit(),
  };
}

function nodeRedisProducer(run) {
  const client = createClient({
    socket: {
      host: "127.0.0.1",
      port,
      connectTimeout: STEP_TIMEOUT_MS,
      reconnectStrategy: false, // a refused handshake must fail the run, not loop
    },
    username: run.username ?? undefined,
    password,
    ...(run.protocol === null ? {} : { RESP: run.protocol }), // given: HELLO <RESP> AUTH …
  });
  client.on("error", () => {}); // surfaced by the rejected command instead
  return {
    connect: () => client.connect().then(() => (client.isReady ? "ready" : "not ready")),
    lpush: (key, payloads) => client.lPush(key, payloads),
    rpush: (key, payloads) => client.rPush(key, payloads),
    xadd: (key, id, fields) => client.xAdd(key, id, fields),
    llen: (key) => client.lLen(key),
    ping: () => client.ping(),
    close: () => client.close(),
  };
}

const LIBRARIES = { ioredis: ioredisProducer, "node-redis": nodeRedisProducer };

async function produce(run) {
  const producer = LIBRARIES[run.library](run);
  const out = {};
  out.connect = await step(producer.connect);
  if (out.connect.error) return out;
  out.ping = await step(producer.ping);
  out.lpush = await step(() => producer.lpush("orders", run.lpush.map(bytes)));
  out.rpush = await step(() => producer.rpush("orders", run.rpush.map(bytes)));
  const fields = {
    payload: bytes(run.xadd.payload),
    priority: run.xadd.priority,
    ...run.xadd.attributes,
  };
  out.xadd = await step(() => producer.xadd("orders", run.xadd.id, fields));
  out.llen = await step(() => producer.llen("orders"));
  // An error reply is one command's failure: the connection carries on.
  out.unknown_queue = await step(() => producer.lpush("nowhere", [Buffer.from("lost")]));
  out.ping_after_error = await step(producer.ping);
  out.llen_after_error = await step(() => producer.llen("orders"));
  out.close = await step(producer.close);
  return out;
}

const plan = JSON.parse(await readStdin());
const results = {};
for (const run of plan.runs) {
  results[run.name] = await produce(run);
}
process.stdout.write(JSON.stringify(results) + "\n");
