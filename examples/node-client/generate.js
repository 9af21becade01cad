// Streams text from an rnngen server, knowing nothing but proto/rnngen/v1/rnngen.proto.
// Usage: npm install && node generate.js 127.0.0.1:50051 "ROMEO:" 200
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const protoRoot = path.resolve(__dirname, "../../proto");
const definition = protoLoader.loadSync(path.join(protoRoot, "rnngen/v1/rnngen.proto"), {
  includeDirs: [protoRoot], keepCase: true, longs: Number, enums: String, defaults: true,
});
const { Generator } = grpc.loadPackageDefinition(definition).rnngen.v1;

const [target = "127.0.0.1:50051", prompt = "ROMEO:", tokens = "200"] = process.argv.slice(2);
const client = new Generator(target, grpc.credentials.createInsecure());

client.ListModels({}, (err, reply) => {
  if (err) { console.error(`ListModels failed: ${err.code} ${err.details}`); process.exit(1); }
  const names = reply.models.map((m) => `${m.name} (${m.cell} ${m.num_layers}x${m.hidden_size}, val_loss ${m.val_loss})`);
  console.error(`models: ${names.join(", ")}`);
  const call = client.Generate({ prompt, params: { max_new_tokens: Number(tokens), seed: 7 } });
  process.stdout.write(prompt);
  call.on("data", (message) => {
    process.stdout.write(message.text);
    if (message.finish_reason !== "FINISH_REASON_UNSPECIFIED") {
      console.error(`\n[finish: ${message.finish_reason}, prompt tokens ${message.usage.prompt_tokens}, ` +
                    `completion tokens ${message.usage.completion_tokens}]`);
    }
  });
  call.on("error", (e) => { console.error(`Generate failed: ${e.code} ${e.details}`); process.exit(1); });
  call.on("end", () => client.close());
});
