"""Prompt sources, random removal, LLM rewrite (fake HTTP server, tiny local model), cache and the mix."""

import http.server
import json
import threading

import numpy as np
import pytest

from ddspo_jax.data import perturb as P
from ddspo_jax.data.prompts import load_prompts
from ddspo_jax.errors import DataError

WORDS = "a red cat dog sitting on the blue chair under sun in garden with tall green trees old man".split()


def _random_prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ prompts


def test_load_prompts_text_jsonl_csv(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a   cat \nb dog\n   \nc bird\n")
    prompts, st = load_prompts(tmp_path / "p.txt")
    assert prompts == ["a cat", "b dog", "c bird"]
    assert (st.read, st.empty, st.duplicates, st.kept) == (6, 2, 1, 3)

    rows = [{"caption": "x y"}, {"caption": ""}, {"caption": None}, {"caption": "x y"}, {"caption": "z"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    prompts, st = load_prompts(tmp_path / "p.jsonl", field="caption")
    assert prompts == ["x y", "z"] and st.empty == 2 and st.duplicates == 1
    with pytest.raises(DataError, match="'prompt'.*p.jsonl|p.jsonl.*'prompt'"):
        load_prompts(tmp_path / "p.jsonl")

    (tmp_path / "p.csv").write_text('id,text\n1,"hello, world"\n2,foo\n3,\n')
    prompts, st = load_prompts(tmp_path / "p.csv", field="text")
    assert prompts == ["hello, world", "foo"] and st.empty == 1
    with pytest.raises(DataError, match="column 'caption' missing"):
        load_prompts(tmp_path / "p.csv", field="caption")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompts(tmp_path / "nope.txt")


def test_parquet_reads(tmp_path):
    import pyarrow as pa  # a dependency of the package
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", "b", "a"]}), tmp_path / "p.parquet")
    assert load_prompts(tmp_path / "p.parquet")[0] == ["a", "b"]


# ----------------------------------------------------------------------------------------- random removal


def test_random_removal_bounds_and_determinism():
    lo, hi = 0.4, 0.7
    for i, prompt in enumerate(_random_prompts(500)):
        words = prompt.split()
        out = P.random_removal(prompt, seed=3, index=i)
        assert out == P.random_removal(prompt, seed=3, index=i)  # deterministic
        kept = out.split()
        n = len(words)
        if n == 1:
            assert out == ""
            continue
        assert 1 <= len(kept) <= n - 1  # never empty, never unchanged
        # kept words are a subsequence of the original (order kept)
        it = iter(words)
        assert all(w in it for w in kept)
        dropped = n - len(kept)
        assert max(1, round(lo * n) - 1) <= dropped <= min(n - 1, round(hi * n) + 1)
    long = " ".join(f"w{j}" for j in range(1000))
    fracs = [1 - len(P.random_removal(long, seed=0, index=i).split()) / 1000 for i in range(200)]
    assert lo - 1e-3 <= min(fracs) and max(fracs) <= hi + 1e-3
    assert np.std(fracs) > 0.05  # actually drawn, not a constant
    # depends on the seed and on the index
    p = "one two three four five six seven eight nine ten"
    outs = {P.random_removal(p, seed=s, index=i) for s in range(3) for i in range(10)}
    assert len(outs) > 20


def test_random_removal_uses_no_global_random():
    import random

    random.seed(1)
    np.random.seed(1)
    a = P.random_removal("a b c d e f g h", seed=0, index=7)
    random.seed(2)
    np.random.seed(2)
    assert P.random_removal("a b c d e f g h", seed=0, index=7) == a


def test_mix_weights_and_determinism():
    class Fixed:
        model_id = "fixed"
        calls = 0

        def chat(self, messages):
            self.calls += 1
            return '{"neg_prompts": ["ugly blurry version"]}'

    rw = P.LLMRewriter("aesthetic", Fixed())
    mix = P.Perturber(seed=0, rewriters={"llm_aesthetic": rw})  # paper default 50/50
    outs = mix.perturb_all(_random_prompts(400))
    frac = sum(o.strategy == "llm_aesthetic" for o in outs) / len(outs)
    assert 0.4 < frac < 0.6
    assert mix.counters["drawn/llm_aesthetic"] + mix.counters["drawn/random_removal"] == 400
    again = P.Perturber(seed=0, rewriters={"llm_aesthetic": rw}).perturb_all(_random_prompts(400), num_threads=4)
    assert again == outs
    with pytest.raises(ValueError, match="needs an LLM rewriter"):
        P.Perturber({"random_removal": 1, "llm_compositional": 1})


GROUPS = {"color": ["red", "blue", "orange"], "animal": ["cat", "dog"], "side": ["left", "right"]}


def test_word_swap_by_hand():
    """Hand-made cases: only group words change, each to another word of its own group; 40-70 % of them (at
    least one) change; a/an agree; punctuation and case stay; a prompt without group words gives None."""
    p = "A red cat left of a blue dog, under the sun."
    for i in range(200):
        out = P.word_swap(p, GROUPS, seed=3, index=i)
        a, b = p.split(), out.split()
        assert len(a) == len(b)
        changed = [(x, y) for x, y in zip(a, b) if x != y and x.lower() not in ("a", "an")]
        assert 2 <= len(changed) <= 4, (out, changed)  # round(U(0.4, 0.7) * 5 group words) in {2, 3, 4}
        for x, y in changed:
            core = x.strip(",.")
            group = next(g for g, ws in GROUPS.items() if core in ws)
            assert y.strip(",.") in GROUPS[group] and y.strip(",.") != core and y[len(y.rstrip(",.")):] == x[len(core):]
        for j, w in enumerate(b[:-1]):  # articles agree with the (possibly new) next word
            if w.lower() in ("a", "an"):
                assert w.lower() == ("an" if b[j + 1][0] in "aeiou" else "a"), out
        assert b[0] in ("A", "An") and b[-2:] == ["the", "sun."]
    assert P.word_swap("an orange cat", GROUPS, seed=0, index=0) in {
        "a red cat", "a blue cat", "an orange dog", "a red dog", "a blue dog"}
    assert P.word_swap("the sun in the garden", GROUPS, seed=0, index=0) is None
    assert P.word_swap(p, GROUPS, seed=3, index=7) == P.word_swap(p, GROUPS, seed=3, index=7)


def test_word_swap_in_the_mix_and_groups_file(tmp_path):
    mix = P.Perturber({"word_swap": 1.0}, seed=0, word_groups=GROUPS)
    outs = mix.perturb_all(["a red cat", "the sun", "a blue dog"])
    assert [o.used for o in outs] == ["word_swap", "random_removal", "word_swap"]
    assert outs[1].fallback_reason == "no_group_word" and mix.counters["fallback/word_swap/no_group_word"] == 1
    with pytest.raises(ValueError, match="needs word groups"):
        P.Perturber({"word_swap": 1.0})
    f = tmp_path / "g.json"
    f.write_text(json.dumps(GROUPS))
    assert P.load_word_groups(f) == GROUPS
    for bad, msg in [({"color": ["red"]}, "group 'color' must list >= 2"),
                     ({"a": ["red", "blue"], "b": ["blue", "cat"]}, "word 'blue' is in groups 'a' and 'b'"),
                     ({"a": ["left of", "right of"]}, "single words"), ([], "non-empty object")]:
        f.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=msg):
            P.load_word_groups(f)
    f.write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        P.load_word_groups(f)


def test_world_word_groups_keep_captions_in_the_world():
    """The shipped world groups: every swapped training caption is still a caption the world's grammar makes
    (same form, its words from the world's vocabulary), and differs from the original."""
    from ddspo_jax.configs.world import PROMPTS
    from ddspo_jax.world import prompts as W

    groups = P.load_word_groups(PROMPTS / "world_word_groups.json")
    assert groups == W.word_groups()  # the shipped file is what `python -m ddspo_jax.world prompts` writes
    vocab = {w for ws in groups.values() for w in ws} | {"a", "an", "photo", "of", "and"}
    for i, m in enumerate(W.read_jsonl(PROMPTS / "world_train.jsonl")[:300]):
        out = P.word_swap(m["prompt"], groups, seed=0, index=i)
        assert out is not None and out != m["prompt"]
        assert set(out.split()) <= vocab, out
        assert [w in vocab - {"a", "an"} for w in out.split()] == [w in vocab - {"a", "an"} for w in m["prompt"].split()]


# -------------------------------------------------------------------------------------- fake HTTP server


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.server.fail_first > 0:
            self.server.fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        prompt = body["messages"][-1]["content"].split("prompt: ", 1)[1]
        if "bad" in prompt:
            content = "Sorry, I cannot help with that."
        else:
            content = ("Important words: [cat]\nFinal output:\n"
                       + json.dumps({"neg_prompts": [f"{prompt}, blurry, washed out"]}))
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.requests, srv.fail_first = [], 0
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_openai_backend_parse_fallback_cache(fake_server, tmp_path):
    url = f"http://127.0.0.1:{fake_server.server_address[1]}/v1"
    backend = P.OpenAIChatBackend(url, "fake-llama", backoff=0.01)
    rw = P.LLMRewriter("aesthetic", backend, cache=tmp_path / "cache")
    mix = P.Perturber({"llm_aesthetic": 1.0}, seed=0, rewriters={"llm_aesthetic": rw})
    good = mix("a cat on a mat", 0)
    assert good.used == "llm_aesthetic" and good.neg_prompt == "a cat on a mat, blurry, washed out"
    req = fake_server.requests[0]
    assert req["model"] == "fake-llama" and req["messages"][0]["role"] == "system"
    assert "degrade the aesthetic quality" in req["messages"][0]["content"]

    bad = mix("a bad prompt here", 1)
    assert bad.used == "random_removal" and bad.fallback_reason == "no_json"
    assert bad.neg_prompt == P.random_removal("a bad prompt here", seed=0, index=1)
    assert mix.counters["fallback"] == 1 and mix.counters["llm/call"] == 2
    assert len(fake_server.requests) == 2

    # a re-run (new objects, same cache folder) never calls the server again, and gives the same answers
    backend2 = P.OpenAIChatBackend(url, "fake-llama")
    mix2 = P.Perturber({"llm_aesthetic": 1.0}, seed=0,
                       rewriters={"llm_aesthetic": P.LLMRewriter("aesthetic", backend2, cache=tmp_path / "cache")})
    assert mix2("a cat on a mat", 0) == good and mix2("a bad prompt here", 1) == bad
    assert len(fake_server.requests) == 2 and backend2.calls == 0 and mix2.counters["llm/cache_hit"] == 2
    # another model is another cache key
    other = P.LLMRewriter("aesthetic", P.OpenAIChatBackend(url, "other"), cache=tmp_path / "cache")
    other.rewrite("a cat on a mat")
    assert len(fake_server.requests) == 3


def test_openai_backend_retries_and_errors(fake_server, tmp_path):
    url = f"http://127.0.0.1:{fake_server.server_address[1]}/v1"
    fake_server.fail_first = 2
    backend = P.OpenAIChatBackend(url, "m", backoff=0.01, max_retries=3)
    assert "blurry" in backend.chat(P.load_template("compositional").messages("a dog"))
    assert backend.calls == 3
    fake_server.fail_first = 10
    with pytest.raises(P.LLMBackendError, match="no answer after 2 attempts"):
        P.OpenAIChatBackend(url, "m", backoff=0.01, max_retries=1).chat([{"role": "user", "content": "prompt: x"}])
    # dead endpoint: raise by default, counted fallback when asked
    dead = P.OpenAIChatBackend("http://127.0.0.1:9/v1", "m", max_retries=0, timeout=2)
    rw = P.LLMRewriter("compositional", dead)
    with pytest.raises(P.LLMBackendError):
        P.Perturber({"llm_compositional": 1}, rewriters={"llm_compositional": rw})("a b c", 0)
    mix = P.Perturber({"llm_compositional": 1}, rewriters={"llm_compositional": rw}, on_error="fallback")
    assert mix("a b c", 0).fallback_reason == "backend_error" and mix.counters["fallback"] == 1


def test_parse_neg_prompts():
    assert P.parse_neg_prompts('{"positive_prompts": ["x"], "neg_prompts": ["a", "  b  c "]}', "p") == (["a", "b c"], None)
    assert P.parse_neg_prompts('{"neg_prompts": []}', "p") == ([], "empty_list")
    assert P.parse_neg_prompts('{"neg_prompts": ["P", 3, ""]}', "p") == ([], "no_valid_entry")
    assert P.parse_neg_prompts('{"neg_prompts": "x"}', "p") == ([], "not_a_list")
    assert P.parse_neg_prompts("words {broken json", "p") == ([], "no_json")
    assert P.parse_neg_prompts("", "p") == ([], "empty_answer")
    text = 'Important words: ["cat"]\nFinal output:\n{\n "positive_prompts": ["nice"],\n "neg_prompts": ["bad cat"]\n}'
    assert P.parse_neg_prompts(text, "cat") == (["bad cat"], None)


def test_templates_are_the_papers():
    comp, aest = P.load_template("compositional"), P.load_template("llm_aesthetic")
    assert "compositional negative prompts" in comp.system and "Important words" in comp.system
    assert '"blurry", "washed out"' in aest.system
    assert comp.messages("a macaw")[1]["content"].endswith("prompt: a macaw")


# ----------------------------------------------------------------------------------- tiny local model


def _tiny_causal_lm(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<eos>", "{", "}", '"', "neg_prompts", ":", "[", "]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>").save_pretrained(path)
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=512, n_embd=16, n_layer=1, n_head=2,
                     bos_token_id=1, eos_token_id=1)
    import torch

    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(path)


def test_local_transformers_backend_falls_back(tmp_path):
    _tiny_causal_lm(tmp_path / "tiny")
    backend = P.TransformersBackend(tmp_path / "tiny", max_new_tokens=8)
    rw = P.LLMRewriter("compositional", backend, cache=tmp_path / "cache")
    mix = P.Perturber({"llm_compositional": 1}, seed=5, rewriters={"llm_compositional": rw})
    out = mix("a red cat sitting on the blue chair", 0)
    # a random model cannot write JSON: the answer is unusable, so random removal is used and counted
    assert out.used == "random_removal" and out.fallback_reason is not None
    assert out.neg_prompt == P.random_removal("a red cat sitting on the blue chair", seed=5, index=0)
    assert mix.counters["fallback"] == 1 and backend.calls == 1
    mix("a red cat sitting on the blue chair", 0)
    assert backend.calls == 1 and mix.counters["llm/cache_hit"] == 1
