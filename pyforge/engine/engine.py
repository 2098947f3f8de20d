"""The engine as a library: load a model, add requests, step, read tokens.

The serving process runs the same object in its loop; scripts, tests and
benchmarks use it in-process.
"""
import itertools
import secrets
import time
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field

import numpy as np

from pyforge.backends import get_backend, kv_dtype
from pyforge.engine.block_manager import BlockManager
from pyforge.engine.config import EngineConfig, EngineFacts
from pyforge.engine.errors import INTERNAL_ERROR, ErrorKind
from pyforge.engine.guided import GuidedDecoding
from pyforge.engine.model_runner import KVCache, ModelRunner, max_draft_rows, size_kv_cache
from pyforge.engine import pooling, prompt_logprobs
from pyforge.engine.sampler import SampledBatch, Sampler
from pyforge.engine.sampling_params import SamplingParams
from pyforge.engine.scheduler import Scheduler
from pyforge.engine.speculative import GAMMA, U64, Speculator, accepted_prefix, verify_rows
from pyforge.engine.sequence import FINISH_REASONS, Sequence, SequenceStatus, check_prompt_ids
from pyforge.loader import load_model_file
from pyforge.native import step_core
from pyforge.loader.quantize import loaded_types, quantized_weights
from pyforge.models.registry import family
from pyforge.models.null import NullModel, pick_token
from pyforge.tokenizer import load_tokenizer


# Below this a forward pass (the null model's, say) hides less than handing the masks
# to their thread costs (a wake-up and the GIL, ~0.1-0.4 ms): compute them in line.
OVERLAP_MIN_FORWARD_S = 0.002


class StepError(RuntimeError):
    """Part of a step failed: the forward pass (out of GPU memory, say) or sampling some
    rows. The sequences it ended, seq_ids, are aborted and their KV blocks freed; every
    other sequence is untouched, and the engine steps on. `outputs` are the step's
    results for the sequences that did succeed (publish them as usual).
    out_of_memory: the cause was a MemoryError (CuPy's OutOfMemoryError is one)."""

    def __init__(self, seq_ids, cause, outputs=()):
        super().__init__(f"{len(seq_ids)} sequence(s) of the step failed: {type(cause).__name__}: {cause}")
        self.seq_ids = list(seq_ids)
        self.outputs = list(outputs)
        self.out_of_memory = isinstance(cause, MemoryError)

    def reply(self):
        """(ErrorKind, message) for the requests this step ended."""
        if self.out_of_memory:
            return ErrorKind.OUT_OF_MEMORY, "the server ran out of memory running this request; retry later"
        return ErrorKind.INTERNAL, INTERNAL_ERROR


@dataclass(slots=True)      # one per token: slots make it cheaper to build
class StepOutput:
    seq_id: int
    token_id: int
    logprob: float
    top_logprobs: list = field(default_factory=list)   # [(token_id, logprob)]
    finish_reason: str | None = None
    embedding: object = None    # an embedding request's result (float32 [hidden_size]); token_id is -1

    @property
    def finished(self):
        return self.finish_reason is not None


class PlainOutputs(SequenceABC):
    """A plain step's outputs (Engine._append_plain) kept as the sampler's arrays: row i is
    seqs[i], which got tokens[i] (logprobs[i], top[i]) and now has statuses[i] (a
    SequenceStatus value). The serving loop encodes them without StepOutputs
    (step_core.publish_plain); read as a sequence, they are StepOutputs, made once."""

    def __init__(self, seqs, tokens, logprobs, top, statuses):
        self.seqs, self.tokens, self.logprobs, self.top, self.statuses = seqs, tokens, logprobs, top, statuses
        self._outputs = None

    def output(self, i):
        """Row i's StepOutput."""
        if self._outputs is not None:
            return self._outputs[i]
        return StepOutput(self.seqs[i].seq_id, int(self.tokens[i]), float(self.logprobs[i]),
                          self.top[i] if self.top is not None else [], FINISH_REASONS.get(int(self.statuses[i])))

    def _list(self):
        if self._outputs is None:
            tops = self.top if self.top is not None else ([] for _ in self.seqs)
            reasons = [FINISH_REASONS.get(s) for s in self.statuses.tolist()]
            self._outputs = [StepOutput(seq.seq_id, token, logprob, row, reason) for seq, token, logprob, row, reason
                             in zip(self.seqs, self.tokens.tolist(), self.logprobs.tolist(), tops, reasons)]
        return self._outputs

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        return self._list()[i]

    def __iter__(self):
        return iter(self._list())


class Engine:
    def __init__(self, model, **options):
        """Engine(EngineConfig(...)), or Engine(model_path, **EngineConfig fields)."""
        self.engine_config = ec = model if isinstance(model, EngineConfig) else EngineConfig(str(model), **options)
        self.model_file = load_model_file(ec.model_path)
        cfg = self.model_file.config
        try:
            model_class = family(cfg.arch).model_class()
        except ValueError as e:
            raise ValueError(f"{ec.model_path}: {e}") from None
        self.config = cfg
        self.tokenizer = load_tokenizer(self.model_file)
        weight_type = kv_dtype.model_weight_type(self.model_file.tensors, loaded_types(self.model_file, ec.quantization))
        self.backend = get_backend(ec.device, n_threads=ec.n_threads, gpu_memory_utilization=ec.gpu_memory_utilization,
                                   head_dim=cfg.head_dim, cuda_graphs=ec.cuda_graphs, kv_cache_dtype=ec.kv_cache_dtype,
                                   weight_type=weight_type)
        if ec.null_model:      # no forward pass: the serving stack's own ceiling (models/null.py)
            self.model = NullModel(cfg, pick_token(self.tokenizer, cfg.vocab_size))
        else:
            with quantized_weights(self.model_file, ec.quantization, self.backend):    # --quantization
                self.model = model_class(self.model_file, self.backend)
        self.max_model_len = min(ec.max_model_len or cfg.context_length, cfg.context_length)
        n_blocks = size_kv_cache(ec, cfg, self.backend, self.model, self.max_model_len)
        self.kv_cache = KVCache(self.backend, cfg, n_blocks, ec.block_size)
        if ec.cuda_graphs and not ec.null_model:
            if self.backend.name != "cuda":
                raise ValueError(f"cuda_graphs needs the cuda device, not {self.backend.name}")
            self.backend.use_cuda_graphs(self.max_model_len, ec.block_size)
            self.backend.graphs.capture_all(self.model.forward_device, self.kv_cache)
        self.facts = EngineFacts(self.max_model_len, cfg.vocab_size, self.tokenizer.eos_ids, cfg.hidden_size)
        self.block_manager = BlockManager(n_blocks, ec.block_size, ec.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, ec.max_num_seqs, ec.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.kv_cache)
        self.sampler = Sampler(n_threads=self.backend.n_threads, eos_ids=self.facts.eos_ids)
        self.guided = GuidedDecoding(self.tokenizer)
        self.speculator = None
        if ec.speculative_config is not None:
            self.speculator = Speculator(ec.speculative_config, max_draft_rows(ec), self.guided)
        self._forward_s = 0.0       # the last forward pass's seconds: is there time to hide masks behind?
        # all-greedy plain steps sampled by the backend itself: the logits stay on the GPU
        self.greedy_on_device = self.backend.samples_on_device and not ec.null_model
        self.sequences = {}
        self.prompt_logprobs_seqs = []    # sequences whose seq.prompt_logprobs grew in the last step
        self._ids = itertools.count()

    # -- requests ----------------------------------------------------------
    def add_request(self, prompt_ids, params=None):
        params = params or SamplingParams()
        prompt_ids = [int(t) for t in prompt_ids]
        self.check_prompt(prompt_ids)
        self.sampler.check_params(params)
        bad = next((t for t, _ in params.logit_bias if t >= self.facts.vocab_size), None)
        if bad is not None:
            raise ValueError(f"logit_bias names token {bad}, outside the vocabulary (0..{self.facts.vocab_size - 1})")
        matcher = self.guided.matcher(params.grammar) if params.grammar is not None else None
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = Sequence(next(self._ids), prompt_ids, params, self.sampler.seed_state(seed), self.max_model_len)
        seq.matcher = matcher
        self.sequences[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq

    def check_prompt(self, prompt_ids):
        check_prompt_ids(prompt_ids, self.facts.max_model_len, self.facts.vocab_size)
        if len(prompt_ids) + 1 > self.block_manager.n_blocks * self.block_manager.block_size:
            raise ValueError("the prompt does not fit in the KV cache")

    def abort(self, seq_id):
        seq = self.sequences.pop(seq_id, None)
        if seq is not None and not seq.status.is_finished:
            self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)

    @property
    def has_work(self):
        return self.scheduler.has_work

    # -- the step ----------------------------------------------------------
    def step(self):
        """Run one forward pass over what the scheduler picked; return new tokens. Embedding
        requests in the plan run a pass of their own (their final hidden state, no logits) and
        return one output each, when their prompt is done; a failure of either pass ends only
        its own sequences."""
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        plan = self.scheduler.schedule()
        self.prompt_logprobs_seqs = []
        kinds = step_core.plan_kinds(plan)
        if not kinds & step_core.KIND_POOLING:
            return self._generate(plan, kinds) if plan else []
        pooled = [entry for entry in plan if entry[0].params.pooling is not None]
        plan = [entry for entry in plan if entry[0].params.pooling is None]
        embedded, failure = [], None
        try:
            embedded = self._embed(pooled)
        except StepError as e:
            failure = e
        try:
            outputs = list(self._generate(plan)) if plan else []
        except StepError as e:
            e.seq_ids[:0] = failure.seq_ids if failure else []
            e.outputs[:0] = embedded
            raise
        if failure:
            failure.outputs = outputs
            raise failure
        return embedded + outputs

    def _embed(self, plan):
        """The embedding entries' forward pass (engine/pooling.py): their hidden rows pooled;
        an output (finish_reason "stop") for each whose prompt is done, its blocks freed."""
        try:
            batch, _ = self.runner.build_batch(plan, pooling.hidden_rows(plan))
            hidden = self.runner.hidden(batch)
            results = [pooling.add_rows(seq, rows) for (seq, _), rows in zip(plan, pooling.split_rows(hidden, plan))]
        except Exception as e:
            seq_ids = [seq.seq_id for seq, _ in plan]
            for seq_id in seq_ids:
                self.abort(seq_id)
            raise StepError(seq_ids, e) from e
        outputs = []
        for (seq, n), vector in zip(plan, results):
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)
            if vector is not None:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
                self.sequences.pop(seq.seq_id, None)
                outputs.append(StepOutput(seq.seq_id, -1, 0.0, finish_reason=seq.finish_reason, embedding=vector))
        return outputs

    def _generate(self, plan, kinds=None):
        """The generating entries' forward pass and sampling: their StepOutputs.
        kinds: step_core.plan_kinds(plan), when the caller has it."""
        kinds = step_core.plan_kinds(plan) if kinds is None else kinds
        masks = greedy = None
        full = _full_logits(plan) if kinds & (step_core.KIND_PROMPT_LOGPROBS | step_core.KIND_DRAFTS) else False
        try:
            batch, sampling = self.runner.build_batch(plan, full)
            seqs = [plan[i][0] for i in sampling]
            # the backend samples an all-greedy plain step itself (None: some row needs the host sampler)
            wants = step_core.greedy_wants(seqs) if self.greedy_on_device and not kinds else None
            if kinds & step_core.KIND_GRAMMAR:
                # grammar masks compute while the forward pass runs, when it runs long enough to hide them
                masks = self.guided.start(seqs, overlap=self._forward_s >= OVERLAP_MIN_FORWARD_S)
            started = time.perf_counter()
            if wants is not None:
                greedy = self.runner.forward_greedy(batch)     # (tokens, logprobs): no logits on the host
            else:
                logits = self.runner.forward(batch)
            self._forward_s = time.perf_counter() - started
            if full and _prompt_logprobs_due(plan, full):
                logits = self._record_prompt_logprobs(plan, full, logits)
            masks = masks and masks.wait()
        except Exception as e:      # nothing of this step was recorded: end its sequences only
            if masks is not None and not isinstance(masks, tuple):
                masks.wait()        # its matchers must be idle before anyone touches them again
            seq_ids = [seq.seq_id for seq, _ in plan]
            for seq_id in seq_ids:
                self.abort(seq_id)
            raise StepError(seq_ids, e) from e
        bm = self.block_manager
        for seq in step_core.advance_computed(plan, bm.block_size if bm.prefix_caching else 0):
            bm.register_full_blocks(seq)
        if greedy is not None:
            return self._append_plain(seqs, self._device_samples(seqs, *greedy, wants))
        rows = _verify_rows(seqs) if kinds & step_core.KIND_DRAFTS else seqs
        try:
            results = self.sampler.sample(logits, rows, masks)
        except Exception:           # find the rows that fail alone: only they end
            results = self._sample_rows(logits, rows, masks)
        if masks is None and rows is seqs and isinstance(results, SampledBatch):
            return self._append_plain(seqs, results)
        return self._append_all(seqs, results)

    def _device_samples(self, seqs, tokens, logprobs, wants):
        """The backend's greedy picks as the host sampler would return them: each row's RNG
        state one draw on, logprobs NaN where nobody asked (unless all_logprobs)."""
        step_core.advance_rng_states(seqs)
        if not self.sampler.all_logprobs:
            logprobs[wants == 0] = np.nan
        return SampledBatch(tokens, logprobs, None)

    def _append_plain(self, seqs, results):
        """append_token for a step without drafts or grammars, its loop native
        (step_core.append_tokens): a PlainOutputs."""
        statuses = step_core.append_tokens(seqs, results.tokens, self.facts.eos_ids)
        ended = np.flatnonzero(statuses != SequenceStatus.RUNNING).tolist()
        if ended:
            self.scheduler.finish_all([(seqs[i], SequenceStatus(int(statuses[i]))) for i in ended])
            for i in ended:
                self.sequences.pop(seqs[i].seq_id, None)
        return PlainOutputs(seqs, results.tokens, results.logprobs, results.top, statuses)

    def _record_prompt_logprobs(self, plan, full, logits):
        """Record the prompt logprobs of this step's full entries; the sampling rows' logits."""
        sampling, prompt_rows = prompt_logprobs.split_logits(logits, plan, full)
        for seq, rows in prompt_rows:
            if prompt_logprobs.record(seq, rows):
                self.prompt_logprobs_seqs.append(seq)
        return sampling

    def _sample_rows(self, logits, seqs, masks):
        """Each row sampled alone: its SampleResult, or the exception it raised."""
        results = []
        for i, seq in enumerate(seqs):
            try:
                results.append(self.sampler.sample(logits[i:i + 1], [seq], _row_mask(masks, i))[0])
            except Exception as e:
                results.append(e)
        return results

    def _append_all(self, seqs, results):
        """The step's outputs; sequences whose rows failed (sampling, or a grammar refusing
        the token) end alone, raised as one StepError carrying the others' outputs.
        results: one per sampler row (a drafted sequence has 1 + len(drafts), in order)."""
        outputs, failed, cause, at = [], [], None, 0
        for seq in seqs:
            rows = results[at:at + 1 + len(seq.draft_tokens)]
            at += len(rows)
            try:
                error = next((r for r in rows if isinstance(r, Exception)), None)
                if error is not None:
                    raise error
                if seq.draft_tokens:
                    outputs.extend(self._accept_drafts(seq, rows))
                else:
                    outputs.append(self.append_token(seq, rows[0]))
            except Exception as e:
                seq.draft_tokens = []
                failed.append(seq.seq_id)
                cause = e
        for seq_id in failed:
            self.abort(seq_id)
        if failed:
            raise StepError(failed, cause, outputs)
        return outputs

    def _accept_drafts(self, seq, results):
        """Emit the agreeing prefix of seq's drafts and the next row's token (speculative.py),
        up to a finish; roll the K/V of the rest back. StepOutputs, in order."""
        drafts, seq.draft_tokens = seq.draft_tokens, []
        n_emit = accepted_prefix(drafts, [r.token_id for r in results])
        # the sampler stepped the state once (row 0); a plain decode would have stepped it per token
        seq.rng_state = (seq.rng_state + (n_emit - 1) * GAMMA) & U64
        outputs = []
        for result in results[:n_emit]:
            outputs.append(self.append_token(seq, result))
            if outputs[-1].finished:
                break
        self.speculator.verified(seq, len(drafts), n_emit - 1)
        if not seq.status.is_finished:
            seq.num_computed_tokens = seq.num_tokens - 1    # the accepted drafts' K/V stays
            self.block_manager.register_full_blocks(seq)
            self.block_manager.trim(seq)
        return outputs

    def append_token(self, seq, result):
        self.guided.advance(seq, result.token_id)      # a refused token fails this row only
        seq.token_ids.append(result.token_id)
        status = seq.check_finished(result.token_id, self.facts.eos_ids)
        out = StepOutput(seq.seq_id, result.token_id, result.logprob, result.top_logprobs)
        if status.is_finished:
            self.scheduler.finish(seq, status)
            self.sequences.pop(seq.seq_id, None)
            out.finish_reason = seq.finish_reason
        return out

    # -- conveniences --------------------------------------------------------
    def generate(self, prompt, params=None):
        """Stream StepOutputs of one request (text prompts are tokenized)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        seq = self.add_request(ids, params)
        try:
            while True:
                for out in self.step():
                    if out.seq_id == seq.seq_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.abort(seq.seq_id)

    def embed(self, prompt, pooling="last"):
        """The normalised embedding (float32 [hidden_size]) of one prompt (text is tokenized)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        seq = self.add_request(ids, SamplingParams(max_tokens=1, pooling=pooling))
        try:
            while True:
                for out in self.step():
                    if out.seq_id == seq.seq_id:
                        return out.embedding
        finally:
            self.abort(seq.seq_id)

    def prompt_logits(self, token_ids):
        """Logits [n, vocab] at every prompt position (for reference checks)."""
        seq = Sequence(-1, list(token_ids), SamplingParams(max_tokens=1), 0, self.max_model_len + 1)
        if not self.block_manager.allocate(seq, len(token_ids)):
            raise ValueError("the prompt does not fit in the KV cache")
        try:
            logits, _ = self.runner.run([(seq, len(token_ids))], all_logits=True)
            return logits
        finally:
            self.block_manager.release(seq)


def _full_logits(plan):
    """Per plan entry, whether it needs logits at every row (its prompt logprobs are due:
    engine/prompt_logprobs.py; it verifies drafts: engine/speculative.py); False when none
    does (the usual step)."""
    if all(seq.prompt_logprobs is None and not seq.draft_tokens for seq, _ in plan):
        return False
    full = [seq.needs_prompt_logits or bool(seq.draft_tokens) for seq, _ in plan]
    return full if any(full) else False


def _prompt_logprobs_due(plan, full):
    """Whether a full entry is there for its prompt logprobs: else every full entry is a
    drafted one, and the logits are already the sampling rows, in order."""
    return any(every and not seq.draft_tokens for (seq, _), every in zip(plan, full))


def _verify_rows(seqs):
    """The sampler's rows: a drafted sequence has one per draft more (speculative.verify_rows;
    guided.start laid the masks out so); an undrafted batch is returned as it is."""
    if not any(seq.draft_tokens for seq in seqs):
        return seqs
    return [row for seq in seqs for row in verify_rows(seq)]


def _row_mask(masks, i):
    """Row i's share of a step's masks, for sampling that row alone."""
    if masks is None:
        return None
    bits, mask_of = masks
    return bits, mask_of[i:i + 1]
