"""Question: does a change to the generation loop slow a single prompt down? One greedy 64-token answer on the real
Gemma 3 270M, by two source trees (e.g. a `git worktree` of the commit before and this one), in separate processes,
alternated over 3 rounds of 2 answers each; prints the median decode tok/s and the median CPU seconds per answer, and
whether both trees gave the same tokens.

Run: python bench/loop_compare.py BEFORE_TREE AFTER_TREE"""
import json, subprocess, sys
CODE = r'''
import sys, time, json, torch
sys.path.insert(0, sys.argv[1])
import gemma3n
from gemma3n.cli import default_model_path
torch.set_num_threads(2)
m = gemma3n.load(default_model_path())
prompt = "Write a long story about a lighthouse keeper and the sea."
m.complete(prompt, max_new_tokens=8, temperature=0)
out = []
for _ in range(int(sys.argv[2])):
    c0, w0 = time.process_time(), time.perf_counter()
    g = m.complete(prompt, max_new_tokens=64, temperature=0)
    out.append({"decode_tok_s": (g.new_tokens - 1) / g.decode_seconds, "cpu_s": time.process_time() - c0,
                "wall_s": time.perf_counter() - w0, "ids": g.token_ids[:64]})
print(json.dumps(out))
'''
trees = sys.argv[1:]
res = {t: [] for t in trees}
for rnd in range(3):
    for t in trees:
        r = subprocess.run([sys.executable, "-c", CODE, t, "2"], capture_output=True, text=True)
        if r.returncode: print(r.stderr[-2000:]); sys.exit(1)
        res[t] += json.loads(r.stdout.strip().splitlines()[-1])
for t in trees:
    tok = sorted(x["decode_tok_s"] for x in res[t]); cpu = sorted(x["cpu_s"] for x in res[t])
    print(t, "median decode tok/s %.1f" % tok[len(tok)//2], "median cpu s %.2f" % cpu[len(cpu)//2])
print("same tokens:", all(res[trees[0]][0]["ids"] == x["ids"] for t in trees for x in res[t]))
