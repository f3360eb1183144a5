// The official grpc-js client, driven by tests/test_interop_js.py.
//
// Reads one JSON plan on stdin and prints one JSON array on stdout. No generated code: the
// generic grpc.Client with identity serializers; the Python test encodes requests and decodes
// responses with trio_worker._pb, passing message bytes as base64.
//
// plan: {target, ca, cert, key (file paths), serverName (optional: the name to verify the
//        server's certificate against, grpc.ssl_target_name_override), deadlineMs,
//        calls: [{method: "/pkg.Service/Method", request: base64, stream: bool}]}
// The calls run concurrently on one channel. Each result:
//   {code, details, metadata: {key: [value, ...]}, responses: [base64, ...]}
// where binary metadata values (keys ending in -bin) are base64 and others strings.
"use strict";

const fs = require("fs");
const grpc = require("@grpc/grpc-js");

const identity = (buffer) => buffer;

function metadataToJson(metadata) {
  const out = {};
  if (!metadata) return out;
  for (const key of Object.keys(metadata.getMap())) {
    out[key] = metadata
      .get(key)
      .map((v) => (Buffer.isBuffer(v) ? v.toString("base64") : String(v)));
  }
  return out;
}

function run(client, call, deadlineMs) {
  const request = Buffer.from(call.request, "base64");
  const options = { deadline: Date.now() + deadlineMs };
  return new Promise((resolve) => {
    const responses = [];
    const finish = (status) =>
      resolve({
        code: status.code,
        details: status.details,
        metadata: metadataToJson(status.metadata),
        responses,
      });
    if (call.stream) {
      const stream = client.makeServerStreamRequest(
        call.method, identity, identity, request, new grpc.Metadata(), options,
      );
      stream.on("data", (message) => responses.push(message.toString("base64")));
      stream.on("error", () => {}); // the status event below carries it
      stream.on("status", finish);
    } else {
      const unary = client.makeUnaryRequest(
        call.method, identity, identity, request, new grpc.Metadata(), options,
        (error, message) => {
          if (message !== undefined) responses.push(message.toString("base64"));
        },
      );
      unary.on("status", finish);
    }
  });
}

async function main() {
  const plan = JSON.parse(fs.readFileSync(0, "utf8"));
  const credentials = grpc.credentials.createSsl(
    fs.readFileSync(plan.ca),
    fs.readFileSync(plan.key),
    fs.readFileSync(plan.cert),
  );
  const options = {};
  if (plan.serverName) {
    options["grpc.ssl_target_name_override"] = plan.serverName;
    options["grpc.default_authority"] = plan.serverName;
  }
  const client = new grpc.Client(plan.target, credentials, options);
  try {
    const results = await Promise.all(
      plan.calls.map((call) => run(client, call, plan.deadlineMs || 30000)),
    );
    process.stdout.write(JSON.stringify(results) + "\n");
  } finally {
    client.close();
  }
}

main().catch((error) => {
  process.stderr.write(`client.js: ${error && error.stack ? error.stack : error}\n`);
  process.exit(2);
});
