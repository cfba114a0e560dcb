// The whole loraforge workflow from Node.js, using only the contracts in proto/:
// app → dataset → upload (client streaming) → version → model → train (watch stream)
// → predict (unary and streaming). Prints one JSON summary line on success.
//
//   LORAFORGE_DATASET_ADDRESS=127.0.0.1:50051 LORAFORGE_TRAINER_ADDRESS=127.0.0.1:50052 \
//   LORAFORGE_PREDICTOR_ADDRESS=127.0.0.1:50053 node clients/node/workflow.mjs DATA.csv [BASE_MODEL_PATH]
//
// Every call carries `authorization: Bearer <key>`: LORAFORGE_API_KEY, else the file
// LORAFORGE_API_KEY_FILE names, else {LORAFORGE_HOME or ~/.loraforge}/admin.key if it exists.
// LORAFORGE_TLS_CA_FILE (a PEM bundle) turns on TLS; LORAFORGE_TLS_CLIENT_CERT_FILE and
// LORAFORGE_TLS_CLIENT_KEY_FILE add a client certificate for services that ask for one.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const here = path.dirname(fileURLToPath(import.meta.url));
const protoRoot = path.resolve(here, "../../proto");
const load = (file) =>
  grpc.loadPackageDefinition(
    protoLoader.loadSync(path.join(protoRoot, file), {
      includeDirs: [protoRoot],
      keepCase: true,
      longs: String,
      enums: String,
      defaults: true,
      oneofs: true,
    }),
  );
const { loraforge } = Object.assign({}, load("loraforge/dataset/v1/dataset_service.proto"));
const trainerPkg = load("loraforge/trainer/v1/trainer_service.proto").loraforge.trainer.v1;
const predictorPkg = load("loraforge/predictor/v1/predictor_service.proto").loraforge.predictor.v1;
const datasetPkg = loraforge.dataset.v1;

const addr = (svc, port) => process.env[`LORAFORGE_${svc}_ADDRESS`] || `127.0.0.1:${port}`;

// A key file's key: its first line that is neither empty nor a comment.
function readKey(file, what) {
  let text;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (err) {
    throw new Error(`${what}: cannot read ${file} (${err.code || err.message})`);
  }
  const line = text.split(/\r?\n/).map((l) => l.trim()).find((l) => l && !l.startsWith("#"));
  if (!line) throw new Error(`${what}: ${file} holds no key`);
  return line;
}

function apiKey() {
  const env = process.env;
  if (env.LORAFORGE_API_KEY?.trim()) return env.LORAFORGE_API_KEY.trim();
  if (env.LORAFORGE_API_KEY_FILE) return readKey(env.LORAFORGE_API_KEY_FILE, "LORAFORGE_API_KEY_FILE");
  const admin = path.join(env.LORAFORGE_HOME || path.join(os.homedir(), ".loraforge"), "admin.key");
  return fs.existsSync(admin) ? readKey(admin, "the admin key") : "";
}

function readPem(variable) {
  const file = process.env[variable];
  if (!file) return null;
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw new Error(`${variable}: cannot read ${file} (${err.code || err.message})`);
  }
}

// TLS when a CA bundle is given; the key on every call, over TLS or plaintext alike (an
// interceptor, since call credentials are only sent over TLS).
function channel() {
  const ca = readPem("LORAFORGE_TLS_CA_FILE");
  const creds = ca
    ? grpc.credentials.createSsl(ca, readPem("LORAFORGE_TLS_CLIENT_KEY_FILE"), readPem("LORAFORGE_TLS_CLIENT_CERT_FILE"))
    : grpc.credentials.createInsecure();
  const key = apiKey();
  const withKey = (options, nextCall) =>
    new grpc.InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        if (key && metadata.get("authorization").length === 0) metadata.set("authorization", `Bearer ${key}`);
        next(metadata, listener);
      },
    });
  return { creds, options: key ? { interceptors: [withKey] } : {} };
}

let creds, options;
try {
  ({ creds, options } = channel());
} catch (err) {
  console.error(`error: ${err.message}`);
  process.exit(1);
}
const datasets = new datasetPkg.DatasetService(addr("DATASET", 50051), creds, options);
const trainer = new trainerPkg.TrainerService(addr("TRAINER", 50052), creds, options);
const predictor = new predictorPkg.PredictorService(addr("PREDICTOR", 50053), creds, options);

const unary = (client, method, request) =>
  new Promise((resolve, reject) =>
    client[method](request, (err, response) => (err ? reject(err) : resolve(response))),
  );

// google.protobuf.Struct as proto-loader expects it.
function toValue(v) {
  if (v === null) return { nullValue: "NULL_VALUE" };
  if (typeof v === "number") return { numberValue: v };
  if (typeof v === "string") return { stringValue: v };
  if (typeof v === "boolean") return { boolValue: v };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  return { structValue: toStruct(v) };
}
function toStruct(obj) {
  return { fields: Object.fromEntries(Object.entries(obj).map(([k, v]) => [k, toValue(v)])) };
}

function upload(datasetName, file) {
  return new Promise((resolve, reject) => {
    const call = datasets.UploadInputs((err, response) => (err ? reject(err) : resolve(response)));
    call.write({ header: { dataset: datasetName, file_name: path.basename(file) } });
    const stream = fs.createReadStream(file, { highWaterMark: 1 << 20 });
    stream.on("data", (chunk) => call.write({ chunk }));
    stream.on("end", () => call.end());
    stream.on("error", reject);
  });
}

function watch(name) {
  return new Promise((resolve, reject) => {
    const states = [];
    let lastProgress = null;
    const call = trainer.WatchModelVersion({ name });
    call.on("data", ({ event }) => {
      if (event.state_change) states.push(event.state_change.state);
      if (event.progress) lastProgress = event.progress;
    });
    call.on("end", () => resolve({ states, lastProgress }));
    call.on("error", reject);
  });
}

function predictStream(model, text) {
  return new Promise((resolve, reject) => {
    let text_ = "";
    let finish = null;
    const call = predictor.PredictStream({ model, input: { text }, params: { max_tokens: 4, temperature: 0 } });
    call.on("data", (msg) => {
      text_ += msg.delta;
      if (msg.finish_reason !== "FINISH_REASON_UNSPECIFIED") finish = msg.finish_reason;
    });
    call.on("end", () => resolve({ text: text_, finish }));
    call.on("error", reject);
  });
}

async function main() {
  const [file, baseModel] = process.argv.slice(2);
  if (!file) throw new Error("usage: node workflow.mjs DATA_FILE [BASE_MODEL_PATH]");
  const suffix = Math.random().toString(16).slice(2, 8);
  const { app } = await unary(datasets, "CreateApp", { app_id: `node-${suffix}`, app: {} });
  const { dataset } = await unary(datasets, "CreateDataset", { parent: app.name, dataset_id: "data", dataset: {} });
  const report = await upload(dataset.name, file);
  const { dataset_version } = await unary(datasets, "CreateDatasetVersion", { parent: dataset.name });
  const { model } = await unary(trainer, "CreateModel", { parent: app.name, model_id: "m", model: {} });
  const overrides = {
    trainer_config: { num_train_epochs: 2, per_device_train_batch_size: 16, learning_rate: 0.003, eval_split_percent: 0 },
    peft_config: { r: 8, lora_alpha: 16, lora_dropout: 0 },
    tokenizer_config: { model_max_length: 128 },
  };
  if (baseModel) overrides.model_config = { pretrained_model_name_or_path: baseModel, torch_dtype: "float32" };
  const { model_version } = await unary(trainer, "CreateModelVersion", {
    parent: model.name,
    template: "templates/HuggingFace_AdvancedConfig",
    dataset_version: dataset_version.name,
    param_overrides: toStruct(overrides),
  });
  const watched = await watch(model_version.name);
  const final = (await unary(trainer, "GetModelVersion", { name: model_version.name })).model_version;
  const prompt = "### Instruction: What is the sentiment of this news? Answer positive, negative or neutral. ### Human: Net sales rose sharply in January . ### Assistant:";
  const predicted = await unary(predictor, "Predict", {
    model: model.name,
    inputs: [{ text: prompt, id: "0" }],
    params: { max_tokens: 4, temperature: 0 },
  });
  const streamed = await predictStream(model_version.name, prompt);
  let badParams = null;
  try {
    await unary(predictor, "Predict", { model: model.name, inputs: [{ text: prompt }], params: { temperature: 9 } });
  } catch (err) {
    badParams = grpc.status[err.code];
  }
  console.log(
    JSON.stringify({
      upload: { format: report.detected_format, accepted: Number(report.rows_accepted), rejected: Number(report.rows_rejected) },
      dataset_version: { name: dataset_version.name, state: dataset_version.state, status_code: dataset_version.status_code },
      training: { states: watched.states, final_state: final.state, status_code: final.status_code, steps: Number(watched.lastProgress?.step ?? 0) },
      predict: { text: predicted.outputs[0].text, finish: predicted.outputs[0].finish_reason, model_version: predicted.model_version },
      stream: streamed,
      bad_params_status: badParams,
    }),
  );
}

main()
  .then(() => process.exit(0))
  .catch((err) => {
    console.error(`error: ${err.code !== undefined ? grpc.status[err.code] + ": " : ""}${err.details || err.message}`);
    process.exit(1);
  });
