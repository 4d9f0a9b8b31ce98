/**
 * The manifest prober of the 32-client phase (bench/fleet.ts), in a process of its own:
 *   node --import tsx bench/manifest-probe.ts URL ACCEPT
 * GETs URL one after another on one kept-alive connection, 20 ms apart, from when it prints
 * "ready" until its stdin ends; then prints the latencies (ms) as one JSON array and exits.
 *
 * It used to run in the benchmark's own process, which also starts a curl for each of the 160
 * layer GETs and reads their output: that event loop stalled for 50-60 ms now and then, and the
 * slowest manifest samples were those stalls (the server's own loop never waited more than 11 ms
 * then), not the server.
 */
import { Agent, request } from 'node:http';

const [url, accept] = process.argv.slice(2);
if (!url || !accept) {
  console.error('usage: manifest-probe.ts URL ACCEPT');
  process.exit(2);
}
const agent = new Agent({ keepAlive: true, maxSockets: 1 });
const get = () =>
  new Promise<number>((resolve, reject) => {
    const req = request(url, { agent, headers: { Accept: accept } }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode ?? 0));
    });
    req.on('error', reject);
    req.end();
  });

let done = false;
process.stdin.on('end', () => (done = true)).resume();
const latencies: number[] = [];
if ((await get()) !== 200) throw new Error(`manifest GET gave no 200 before the load`);
console.log('ready');
while (!done) {
  const started = performance.now();
  const status = await get();
  if (status !== 200) throw new Error(`manifest GET during the load gave HTTP ${status}`);
  latencies.push(performance.now() - started);
  await new Promise((r) => setTimeout(r, 20));
}
agent.destroy();
console.log(JSON.stringify(latencies));
