// A real TLS peer that half-closes (Node's tls with allowHalfOpen): the other end of the
// balancer's TLS in tests/test_tlsstream.py.
//
//   node tls_peer.js server MODE --cert FILE --key FILE [--pause-ms MS]
//       prints "listening <port>", serves until killed (with --pause-ms, reads nothing for
//       the first MS ms of each connection). MODE:
//       sink:  counts bytes until the client's close_notify, then answers
//              "received <count>\n" and ends (close_notify, FIN)
//       first: sends "bye\n" and ends at once, keeps reading; at the client's end prints
//              "received <count>" on stdout
//   node tls_peer.js client MODE --port P --ca FILE --name NAME --bytes N [--max-version V]
//       prints one JSON line {"received": "<what the server sent>"} and exits. MODE:
//       sink:  sends N bytes, ends (its close_notify), reads until the server's end
//       first: reads until the server's end, then sends N bytes and ends
"use strict";
const fs = require("fs");
const tls = require("tls");

const [role, mode, ...rest] = process.argv.slice(2);
const opts = {};
for (let i = 0; i < rest.length; i += 2) opts[rest[i].replace(/^--/, "")] = rest[i + 1];

if (role === "server") {
  const server = tls.createServer(
    { key: fs.readFileSync(opts.key), cert: fs.readFileSync(opts.cert), allowHalfOpen: true },
    (socket) => {
      let count = 0;
      if (opts["pause-ms"]) {  // a slow reader: nothing read at first
        socket.pause();
        setTimeout(() => socket.resume(), Number(opts["pause-ms"]));
      }
      socket.on("error", () => socket.destroy());
      socket.on("data", (chunk) => { count += chunk.length; });
      if (mode === "first") socket.end("bye\n");
      socket.on("end", () => {
        if (mode === "sink") socket.end(`received ${count}\n`);
        else console.log(`received ${count}`);
      });
    });
  server.listen(0, "127.0.0.1", () => console.log(`listening ${server.address().port}`));
  process.on("SIGTERM", () => process.exit(0));
} else {
  const payload = Buffer.alloc(Number(opts.bytes || 0), "x");
  const socket = tls.connect({
    host: "127.0.0.1", port: Number(opts.port), servername: opts.name,
    ca: fs.readFileSync(opts.ca), allowHalfOpen: true, maxVersion: opts["max-version"] || "TLSv1.3",
  }, () => { if (mode === "sink") socket.end(payload); });
  let received = "";
  socket.setEncoding("latin1");
  socket.on("data", (chunk) => { received += chunk; });
  socket.on("end", () => {
    if (mode === "first") socket.end(payload);
    socket.on("close", () => { console.log(JSON.stringify({ received })); });
    if (mode !== "first") socket.end();
  });
  socket.on("error", (err) => { console.log(JSON.stringify({ error: err.message })); process.exit(1); });
  setTimeout(() => { console.log(JSON.stringify({ error: "timeout", received })); process.exit(1); }, 20000).unref();
}
