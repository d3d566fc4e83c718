#!/usr/bin/env node
// A sample HTTP app for `balancer demo` and docker-compose.yml: it names itself in every
// answer so you can see which backend the balancer picked. No npm dependencies on purpose,
// so it runs with a bare `node app.js` (or the node:20-alpine image) and nothing to install.
//
// Options: --port N (0 = ephemeral; env PORT), --host H (default 127.0.0.1; env HOST),
//          --name NAME (env APP_NAME; default: app-$INSTANCE when the balancer runs it as
//          one of an upstream's instances, else the hostname).
// Prints exactly one line `listening <port>` on stdout once bound, so a parent process
// learns an ephemeral port. Exits 0 on SIGTERM/SIGINT.
'use strict';

const http = require('http');
const os = require('os');

function option(flag, envName, fallback) {
  const args = process.argv.slice(2);
  for (let i = 0; i < args.length; i++) {
    if (args[i] === flag && i + 1 < args.length) return args[i + 1];
    if (args[i].startsWith(flag + '=')) return args[i].slice(flag.length + 1);
  }
  const fromEnv = process.env[envName];
  return fromEnv !== undefined && fromEnv !== '' ? fromEnv : fallback;
}

const host = option('--host', 'HOST', '127.0.0.1');
const port = Number(option('--port', 'PORT', '0'));
const instance = process.env.INSTANCE;
const name = option('--name', 'APP_NAME', instance ? `app-${instance}` : os.hostname());

if (!Number.isInteger(port) || port < 0 || port > 65535) {
  process.stderr.write(`invalid port: ${port}\n`);
  process.exit(2);
}

const server = http.createServer((req, res) => {
  const path = (req.url || '/').split('?')[0];
  if (path === '/health') {
    send(res, 'text/plain; charset=utf-8', 'ok\n');
    return;
  }
  const wantsJson = (req.headers.accept || '').includes('application/json');
  if (wantsJson) {
    const body = { name, pid: process.pid, host: os.hostname(), method: req.method, url: req.url };
    send(res, 'application/json', JSON.stringify(body) + '\n');
  } else {
    send(res, 'text/plain; charset=utf-8',
      `hello from ${name} (pid ${process.pid}, host ${os.hostname()})\n`);
  }
});

function send(res, type, body) {
  res.writeHead(200, {
    'Content-Type': type,
    'Content-Length': Buffer.byteLength(body),
    'X-Backend': name,
  });
  res.end(body);
}

// Keep-alive is on by default in Node; make the idle timeout explicit and longer than a
// typical client's so the balancer's pooled or reused connections are not cut mid-request.
server.keepAliveTimeout = 65000;
server.headersTimeout = 66000;

server.on('error', (err) => {
  process.stderr.write(`${name}: ${err.message}\n`);
  process.exit(1);
});

server.listen(port, host, () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});

let stopping = false;
function stop(signal) {
  if (stopping) return;
  stopping = true;
  process.stderr.write(`${name}: ${signal}, stopping\n`);
  server.close(() => process.exit(0));
  // Idle keep-alive sockets would hold close() open; drop them now, and cap the wait anyway.
  server.closeIdleConnections();
  setTimeout(() => {
    server.closeAllConnections();
    process.exit(0);
  }, 2000).unref();
}
process.on('SIGTERM', () => stop('SIGTERM'));
process.on('SIGINT', () => stop('SIGINT'));
