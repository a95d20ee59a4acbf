"""A hand-built GPT-2 with planted heads and its word-level tokenizer: the positive control of head roles.

Nothing here is trained. The residual stream has dedicated dimensions (``DIMS``) and every planted head
reads and writes only its own:

- ``PREV_HEAD`` (layer 0, head 0) attends to position ``i - 1`` from every position ``i`` (query: the
  position one-hot shifted by one; key: the position one-hot) and writes a value that is non-zero at
  every source, BOS included (a value bias).
- ``MERGE_HEAD`` (layer 0, head 2): at a later subword (a continuation token, no leading space) it attends
  to ``i - 1`` (the earlier subword of the same word); at a first subword (a word-start token) a BOS
  channel in its query and key outbids that, so it parks on BOS, whose value is zero: no influence there.
- ``DOMAIN_HEAD`` (layer 1, head 1) attends to itself and its value reads only the CODE feature, which
  only the code vocabulary's tokens carry: active on code tokens, zero elsewhere.
- Every other head and both FFNs have small random weights and write only into the JUNK dimensions,
  so they leave the planted features untouched.

LayerNorm: every embedding row is zero-mean (a balancing block absorbs its sum) and every block writes
zero-mean vectors, so the residual stream stays zero-mean and ``LN(x) = x / sigma(x)`` (gains 1, biases
0): a dimension that is 0 in ``x`` is (up to float rounding of the mean, ~1e-8) 0 after LayerNorm.

The tokenizer splits text into the vocabulary's pieces (a regex pre-tokenizer, longest piece first, and
a word-level model) and adds ``<bos>`` itself at position 0 (a TemplateProcessing post-processor).
Texts are words joined by single spaces, each word with a leading space, so that ``flowray.text``'s
word alignment gives exactly the pieces of ``WORDS`` as each word's subwords.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

BOS, UNK = "<bos>", "<unk>"
# words as their pieces: first piece with its leading space, later pieces without
WORDS = {
    "general": [
        (" the",), (" a",), (" cat",), (" dog",), (" sat",), (" ran",), (" on",), (" mat",), (" big",),
        (" red",), (" un", "believ", "able"), (" re", "play", "ed"), (" re", "play", "ing"),
        (" wonder", "ful"), (" wonder", "ful", "ly"), (" quick", "ly"), (" quick", "ness"),
        (" care", "ful"), (" care", "ful", "ly"), (" un", "able"),
    ],
    "code": [
        (" def",), (" return",), (" self",), (" import",), (" print",), (" lambda",), (" len",), (" str",),
        (" none",), (" yield",), (" get", "attr"), (" set", "attr"), (" get", "item"), (" set", "item"),
        (" is", "instance"), (" kw", "args"), (" get", "item", "args"), (" str", "attr", "item"),
    ],
}
# (layer, head) of the planted heads; flat ids are layer * N_HEADS + head
PREV_HEAD, MERGE_HEAD, DOMAIN_HEAD = (0, 0), (0, 2), (1, 1)
N_LAYERS, N_HEADS, D_MODEL, N_POSITIONS = 2, 4, 256, 48
HEAD_DIM = D_MODEL // N_HEADS  # 64
D_FFN = 64

# residual dimensions (ranges are half-open)
DIMS = {
    "pos": range(0, N_POSITIONS),  # position one-hot
    "word": 48, "start": 49, "cont": 50, "code": 51, "bos": 52,  # token features
    "ident": range(56, 96),  # random token identity (not BOS)
    "out_prev": range(96, 112), "out_merge": range(112, 128), "out_domain": range(128, 144),
    "junk": range(144, 240),  # what random heads and FFNs write
    "balance": range(240, 256),  # absorbs each embedding row's sum: rows are zero-mean
}
POS_SCALE, FEATURE_SCALE, BOS_SCALE, IDENT_SCALE = 4.0, 2.0, 4.0, 0.5
SHIFT, BOS_CHANNEL, SELF = 1.5, 3.0, 3.0  # query/key weights: logits ~ 27 (shift), ~ 58 (BOS), >~ 25 (self, layer 1)
RANDOM_STD = 0.05
OUT_GAIN = {"prev": 0.6, "merge": 0.6, "domain": 3.0}  # the domain head is the code domain's strongest


def pieces() -> list[str]:
    """Every vocabulary piece, specials first, in id order."""
    out = [BOS, UNK]
    for words in WORDS.values():
        for word in words:
            out += [p for p in word if p not in out]
    return out


def code_pieces() -> set[str]:
    return {p for word in WORDS["code"] for p in word}


def build_tokenizer():
    """A fast tokenizer over ``pieces()`` that prepends ``<bos>`` (offsets (0, 0)) to every text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {p: i for i, p in enumerate(pieces())}
    overlap = code_pieces() & {p for word in WORDS["general"] for p in word}
    if overlap:  # a piece in both domains would make the domain feature ambiguous
        raise ValueError(f"pieces shared by the general and code vocabularies: {sorted(overlap)}")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    alternatives = sorted((p for p in vocab if p not in (BOS, UNK)), key=len, reverse=True)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(re.escape(p) for p in alternatives)),
                                             behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, vocab[BOS])])
    tok.decoder = decoders.Fuse()
    # <bos> is also the end-of-text token (GPT-2 style): whatever a job takes as the BOS, it is id 0. The
    # post-processor adds it; transformers' ``add_bos_token`` attribute still reads False (5.24): look at
    # the encoded ids to know whether a tokenizer adds a BOS.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, unk_token=UNK,
                                   pad_token=UNK)


def _zero_mean_rows(w: torch.Tensor, cols) -> torch.Tensor:
    """Centre each row of ``w`` over the columns ``cols`` (its support): rows then sum to 0."""
    cols = list(cols)
    w[:, cols] -= w[:, cols].mean(1, keepdim=True)
    return w


def _embeddings(vocab: list[str], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    d, D = D_MODEL, DIMS
    wte = torch.zeros(len(vocab), d)
    code = code_pieces()
    ident = list(D["ident"])
    for i, piece in enumerate(vocab):
        if piece == BOS:
            wte[i, D["bos"]] = BOS_SCALE
        else:
            wte[i, D["word"]] = FEATURE_SCALE
            wte[i, D["start"] if piece.startswith(" ") else D["cont"]] = FEATURE_SCALE
            if piece in code:
                wte[i, D["code"]] = FEATURE_SCALE
            wte[i, ident] = torch.randn(len(ident), generator=gen) * IDENT_SCALE
    wpe = torch.zeros(N_POSITIONS, d)
    wpe[torch.arange(N_POSITIONS), torch.arange(N_POSITIONS)] = POS_SCALE
    balance = list(D["balance"])
    for w in (wte, wpe):  # zero-mean rows: the sum spread over the balancing block
        w[:, balance] = -w.sum(1, keepdim=True) / len(balance)
    return wte, wpe


def _random_block(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Small random weights of one GPT-2 block (Conv1D layout [in, out]); outputs into JUNK, zero-mean."""
    d, junk = D_MODEL, list(DIMS["junk"])
    c_attn = torch.randn(d, 3 * d, generator=gen) * RANDOM_STD
    c_proj = torch.zeros(d, d)
    c_proj[:, junk] = torch.randn(d, len(junk), generator=gen) * RANDOM_STD
    fc = torch.randn(d, D_FFN, generator=gen) * RANDOM_STD
    mlp_proj = torch.zeros(D_FFN, d)
    mlp_proj[:, junk] = torch.randn(D_FFN, len(junk), generator=gen) * RANDOM_STD
    return {"c_attn": c_attn, "c_proj": _zero_mean_rows(c_proj, junk), "fc": fc,
            "mlp_proj": _zero_mean_rows(mlp_proj, junk)}


def _head_cols(kind: str, head: int) -> slice:
    """Columns of c_attn holding ``head``'s query, key or value."""
    offset = {"q": 0, "k": D_MODEL, "v": 2 * D_MODEL}[kind] + head * HEAD_DIM
    return slice(offset, offset + HEAD_DIM)


def _plant_position_attention(c_attn: torch.Tensor, head: int, shift: int, weight: float) -> None:
    """Query at position p = one-hot(p - shift), key at j = one-hot(j): the head attends to p - shift."""
    q, k = _head_cols("q", head), _head_cols("k", head)
    c_attn[:, q], c_attn[:, k] = 0.0, 0.0
    pos = list(DIMS["pos"])
    for p in pos:
        if p - shift >= 0:
            c_attn[p, q.start + p - shift] = weight
        c_attn[p, k.start + p] = weight


def _plant_output(c_proj: torch.Tensor, head: int, block, gain: float) -> None:
    """The head's rows of c_proj: its first ``len(block)`` value dims onto ``block``, centred."""
    rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
    c_proj[rows] = 0.0
    block = list(block)
    for e, out in enumerate(block):
        c_proj[head * HEAD_DIM + e, out] = gain
    c_proj[rows] = _zero_mean_rows(c_proj[rows].clone(), block)


def build_model(tokenizer, seed: int = 0):
    """The planted GPT2LMHeadModel (eval mode, eager attention) for ``build_tokenizer()``'s vocabulary."""
    import transformers as tf

    vocab = pieces()
    if len(tokenizer) != len(vocab):
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the planted vocabulary {len(vocab)}")
    cfg = tf.GPT2Config(vocab_size=len(vocab), n_positions=N_POSITIONS, n_embd=D_MODEL, n_layer=N_LAYERS,
                        n_head=N_HEADS, n_inner=D_FFN, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=True)
    cfg._attn_implementation = "eager"
    model = tf.GPT2LMHeadModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    wte, wpe = _embeddings(vocab, gen)
    blocks = [_random_block(gen) for _ in range(N_LAYERS)]
    ident, D, v_dims = list(DIMS["ident"]), DIMS, 16

    # layer 0, PREV_HEAD: attends to p - 1; value = a value bias (non-zero at BOS too) + token identity
    c_attn, c_proj = blocks[0]["c_attn"], blocks[0]["c_proj"]
    h = PREV_HEAD[1]
    _plant_position_attention(c_attn, h, shift=1, weight=SHIFT)
    v = _head_cols("v", h)
    c_attn[:, v] = 0.0
    c_attn[ident, v.start : v.start + v_dims] = torch.randn(len(ident), v_dims, generator=gen) * 0.3
    prev_value_bias = torch.randn(v_dims, generator=gen)
    _plant_output(c_proj, h, D["out_prev"], OUT_GAIN["prev"])

    # layer 0, MERGE_HEAD: attends to p - 1, except word-start tokens, which a BOS channel sends to BOS
    h = MERGE_HEAD[1]
    _plant_position_attention(c_attn, h, shift=1, weight=SHIFT)
    q, k = _head_cols("q", h), _head_cols("k", h)
    channel = N_POSITIONS  # the first head dim after the position one-hot
    c_attn[D["start"], q.start + channel] = BOS_CHANNEL
    c_attn[D["bos"], k.start + channel] = BOS_CHANNEL
    v = _head_cols("v", h)
    c_attn[:, v] = 0.0  # reads only features BOS lacks, no bias: zero value at BOS
    c_attn[D["word"], v.start : v.start + v_dims] = torch.randn(v_dims, generator=gen)
    c_attn[ident, v.start : v.start + v_dims] = torch.randn(len(ident), v_dims, generator=gen) * 0.3
    _plant_output(c_proj, h, D["out_merge"], OUT_GAIN["merge"])

    # layer 1, DOMAIN_HEAD: attends to itself; value reads only the CODE feature
    c_attn, c_proj = blocks[1]["c_attn"], blocks[1]["c_proj"]
    h = DOMAIN_HEAD[1]
    _plant_position_attention(c_attn, h, shift=0, weight=SELF)
    v = _head_cols("v", h)
    c_attn[:, v] = 0.0
    c_attn[D["code"], v.start : v.start + v_dims] = torch.randn(v_dims, generator=gen)
    _plant_output(c_proj, h, D["out_domain"], OUT_GAIN["domain"])

    with torch.no_grad():
        model.transformer.wte.weight.copy_(wte)
        model.transformer.wpe.weight.copy_(wpe)
        for layer, (block, w) in enumerate(zip(model.transformer.h, blocks)):
            block.attn.c_attn.weight.copy_(w["c_attn"])
            block.attn.c_attn.bias.zero_()
            block.attn.c_proj.weight.copy_(w["c_proj"])
            block.attn.c_proj.bias.zero_()
            block.mlp.c_fc.weight.copy_(w["fc"])
            block.mlp.c_fc.bias.zero_()
            block.mlp.c_proj.weight.copy_(w["mlp_proj"])
            block.mlp.c_proj.bias.zero_()
            for ln in (block.ln_1, block.ln_2):
                ln.weight.fill_(1.0)
                ln.bias.zero_()
        v = _head_cols("v", PREV_HEAD[1])
        model.transformer.h[PREV_HEAD[0]].attn.c_attn.bias[v.start : v.start + v_dims] = prev_value_bias
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.ln_f.bias.zero_()
    model.tie_weights()
    return model.eval()


def save_planted(path, seed: int = 0) -> Path:
    """Write the planted model and its tokenizer to ``path`` (a directory ``flowray.load_model`` reads)."""
    path = Path(path)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_texts(domain: str, n: int, seed: int = 0, n_words: int = 12, single_share: float = 0.6) -> list[str]:
    """``n`` texts of ``n_words`` words of ``domain``; about ``single_share`` of the words are one token.

    Each text is the words' pieces concatenated: it starts with a space and words are separated by
    exactly one space (letters and single spaces only, no whitespace-only token).
    """
    rng = random.Random(f"{domain}-{seed}")
    single = [w for w in WORDS[domain] if len(w) == 1]
    multi = [w for w in WORDS[domain] if len(w) > 1]
    texts = []
    for _ in range(n):
        words = [rng.choice(single if rng.random() < single_share else multi) for _ in range(n_words)]
        texts.append("".join(p for word in words for p in word))
    return texts
