// SSE subscribers for bench/sse.py: opens N streams to URL and records, for every frame
// that carries a message number ("n":<int> in its data), when it arrived.
// Usage: node sse_subscribers.js URL N OUT_FILE   (records until it gets SIGTERM)
// Writes one line per stream to OUT_FILE: the arrival times (ms, performance clock
// shifted to the Unix epoch) of messages, as JSON {"n": t, ...}.
"use strict";
const net = require("net");
const fs = require("fs");
const { performance } = require("perf_hooks");

const [url, count, outFile] = process.argv.slice(2);
const target = new URL(url);
const now = () => performance.timeOrigin + performance.now();
const streams = [];
let connected = 0;

function open(index) {
  const arrivals = {};
  streams.push(arrivals);
  const socket = net.connect(Number(target.port), target.hostname, () => {
    socket.write(`GET ${target.pathname}${target.search} HTTP/1.1\r\nHost: bench\r\n` +
                 "Accept: text/event-stream\r\n\r\n");
  });
  let headersDone = false;
  socket.setEncoding("latin1");
  socket.on("data", (chunk) => {
    const at = now();
    if (!headersDone && chunk.includes("\r\n\r\n")) {
      headersDone = true;
      connected += 1;
      if (connected === Number(count)) console.log("connected");
    }
    const re = /(?:"n":|evt_b_)(\d+)/g;
    let m;
    while ((m = re.exec(chunk)) !== null) {
      if (!(m[1] in arrivals)) arrivals[m[1]] = at;
    }
  });
  socket.on("error", () => {});
}

for (let i = 0; i < Number(count); i++) open(i);
process.on("SIGTERM", () => {
  fs.writeFileSync(outFile, streams.map((s) => JSON.stringify(s)).join("\n"));
  process.exit(0);
});
