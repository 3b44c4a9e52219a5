// Greedy generation with transformers.js from a folder written by `gemma3n export onnx`, local files only.
// usage: node generate.mjs FOLDER DTYPE MAX_NEW_TOKENS PROMPT_JSON
//   PROMPT_JSON: {"text": "..."} (one user turn, through the folder's chat template) and optionally "image": a path.
// Prints one JSON line: {"prompt_ids": [...], "new_ids": [...]}.
import fs from 'node:fs';
import path from 'node:path';
import {
    env, AutoProcessor, Gemma3nForCausalLM, Gemma3nForConditionalGeneration, RawImage,
} from '@huggingface/transformers';

const [folder, dtype, maxNewTokens, promptJson] = process.argv.slice(2);
const prompt = JSON.parse(promptJson);

env.allowRemoteModels = false; // local files only: nothing may be fetched
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(folder));
const id = path.basename(path.resolve(folder));

const processor = await AutoProcessor.from_pretrained(id);
// A text-only export has no towers: the CausalLM class loads just embed_tokens and decoder_model_merged.
const towers = fs.readdirSync(path.join(path.resolve(folder), 'onnx')).some((f) => f.startsWith('vision_encoder'));
const ModelClass = towers ? Gemma3nForConditionalGeneration : Gemma3nForCausalLM;
const model = await ModelClass.from_pretrained(id, { dtype, device: 'cpu' });

const content = [];
if (prompt.image) content.push({ type: 'image' });
content.push({ type: 'text', text: prompt.text });
const text = processor.apply_chat_template([{ role: 'user', content }], { add_generation_prompt: true });
const image = prompt.image ? await RawImage.read(prompt.image) : null;
const inputs = await processor(text, image, null, { add_special_tokens: false });

const output = await model.generate({ ...inputs, max_new_tokens: Number(maxNewTokens), do_sample: false });
const all = Array.from(output.tolist()[0], Number);
const promptIds = Array.from(inputs.input_ids.tolist()[0], Number);
console.log(JSON.stringify({ prompt_ids: promptIds, new_ids: all.slice(promptIds.length) }));
