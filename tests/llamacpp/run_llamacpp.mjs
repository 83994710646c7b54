// Run GGUF files in llama.cpp (node-llama-cpp's prebuilt CPU build) and print what it computed, as JSON.
//
//   node run_llamacpp.mjs spec.json      LLAMACPP_DIR: the folder install.sh filled (has node_modules/)
//
// spec.json: {"runs": [{"model": "m.gguf", "lora": "a.gguf" | null, "tokens": [ids...],
//                       "prompt": [ids...], "n_predict": 16}]}
// For each run, on stdout: {"top1": the argmax next token after each of `tokens` (teacher forced),
//   "logits": the full next-token logits at each position, "greedy": n_predict tokens generated greedily
//   after `prompt`}. Token ids go in and come out, so the comparison never depends on llama.cpp's tokenizer.
import {readFileSync} from "node:fs";
import {join} from "node:path";
import {pathToFileURL} from "node:url";

const lib = process.env.LLAMACPP_DIR;
const {getLlama, LlamaLogLevel} = await import(pathToFileURL(join(lib, "node_modules/node-llama-cpp/dist/index.js")).href);
const spec = JSON.parse(readFileSync(process.argv[2], "utf8"));
// build "never": use the prebuilt binary or fail; never compile or download at test time
const llama = await getLlama({gpu: false, build: "never", skipDownload: true, logLevel: LlamaLogLevel.error});
const results = [];
for (const run of spec.runs) {
    const model = await llama.loadModel({modelPath: run.model, gpuLayers: 0});
    const lora = run.lora ? {lora: {adapters: [{filePath: run.lora, scale: 1}]}} : {};
    const size = Math.max(run.tokens.length, run.prompt.length + run.n_predict) + 8;
    let ctx = await model.createContext({contextSize: size, batchSize: size, threads: 2, ...lora});
    const out = await ctx.getSequence().controlledEvaluate(
        run.tokens.map(t => [t, {generateNext: {token: true, logits: true}}]));
    const top1 = out.map(o => o.next.token);
    const logits = out.map(o => {
        const row = [];
        for (const [tok, v] of o.next.logits) row[tok] = v;
        return Array.from(row, v => v ?? null);
    });
    await ctx.dispose();
    ctx = await model.createContext({contextSize: size, batchSize: size, threads: 2, ...lora});
    const greedy = [];
    for await (const t of ctx.getSequence().evaluate(run.prompt, {temperature: 0})) {
        greedy.push(t);
        if (greedy.length >= run.n_predict) break;
    }
    await ctx.dispose();
    await model.dispose();
    results.push({top1, logits, greedy});
}
process.stdout.write(JSON.stringify(results));
await llama.dispose();
