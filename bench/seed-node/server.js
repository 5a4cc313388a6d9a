// The original Node.js design of the enriched contacts endpoint, for side-by-side
// benchmarks: MGET the cached customers and users, fetch the misses from the CRM
// in batches of 100 (in parallel), store them with a pipeline of SET EX 300,
// return the page. Same upstream contract and /contacts API as docs/api.md.
// Env: PORT, WHATSAPP_API_URL, CRM_API_URL, REDIS_URL, USE_REDIS.
// Set up: copy this folder somewhere writable, `npm ci`, `node server.js` (`make bench` does).
const Fastify = require("fastify");
const Redis = require("ioredis");
const { Pool } = require("undici");

const TTL = 300, BATCH = 100;
const useRedis = process.env.USE_REDIS !== "false";
const redis = useRedis ? new Redis(process.env.REDIS_URL || "redis://127.0.0.1:6379", { maxRetriesPerRequest: 1, enableOfflineQueue: false, commandTimeout: 250 }) : null;
if (redis) redis.on("error", () => {});
const wa = new URL(process.env.WHATSAPP_API_URL), crm = new URL(process.env.CRM_API_URL);
const waPool = new Pool(wa.origin, { connections: 64 }), crmPool = new Pool(crm.origin, { connections: 64 });

async function getJson(pool, path, headers) {
  const r = await pool.request({ path, method: "GET", headers });
  const text = await r.body.text();
  return { status: r.statusCode, body: text };
}

async function resolve(kind, instance, ids, auth) {
  const out = new Map();
  if (!ids.length) return out;
  const keys = ids.map((id) => `${kind}:${instance}:${id}`);
  let cached = [];
  if (redis) { try { cached = await redis.mget(keys); } catch { cached = []; } }
  const misses = [];
  ids.forEach((id, i) => { if (cached[i] != null) out.set(id, JSON.parse(cached[i])); else misses.push(id); });
  const batches = [];
  for (let i = 0; i < misses.length; i += BATCH) batches.push(misses.slice(i, i + BATCH));
  const api = kind === "customer" ? "customers" : "users";
  const results = await Promise.all(batches.map((b) => getJson(crmPool, `${crm.pathname.replace(/\/$/, "")}/${instance}/${api}?ids=${b.join(",")}`, auth ? { authorization: auth } : {})));
  const pipe = redis ? redis.pipeline() : null;
  for (const r of results) {
    if (r.status !== 200) continue;
    for (const obj of JSON.parse(r.body).data) {
      out.set(String(obj.id), obj);
      if (pipe) pipe.set(`${kind}:${instance}:${obj.id}`, JSON.stringify(obj), "EX", TTL);
    }
  }
  if (pipe && pipe.length) pipe.exec().catch(() => {});
  return out;
}

const app = Fastify({ logger: false });
app.get("/health", async () => ({ status: "ok" }));
app.get("/contacts", async (req, reply) => {
  const { instance, ...rest } = req.query;
  if (!instance || !/^[a-z0-9][a-z0-9_-]{0,62}$/.test(instance)) return reply.code(422).send({ detail: "bad instance" });
  const qs = new URLSearchParams(rest).toString();
  const auth = req.headers.authorization;
  const r = await getJson(waPool, `${wa.pathname.replace(/\/$/, "")}/${instance}/contacts${qs ? "?" + qs : ""}`, auth ? { authorization: auth } : {});
  if (r.status !== 200) return reply.code(r.status >= 500 ? 502 : r.status).type("application/json").send(r.body);
  const page = JSON.parse(r.body);
  const cids = [...new Set(page.data.filter((c) => c.customerId != null).map((c) => String(c.customerId)))];
  const uids = [...new Set(page.data.filter((c) => c.userId != null).map((c) => String(c.userId)))];
  const [cm, um] = await Promise.all([resolve("customer", instance, cids, auth), resolve("user", instance, uids, auth)]);
  for (const c of page.data) {
    c.customer = c.customerId != null ? cm.get(String(c.customerId)) ?? null : null;
    c.user = c.userId != null ? um.get(String(c.userId)) ?? null : null;
  }
  return page;
});
app.listen({ port: Number(process.env.PORT || 3000), host: "127.0.0.1" });
