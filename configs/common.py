"""Defaults shared by every config; each config file overrides what differs. Every field is commented."""

import ml_collections

from mixie.model.llama import PROJECTIONS


def base_config() -> ml_collections.ConfigDict:
  """The full config tree with defaults; `configs/*.py` start from it."""
  c = ml_collections.ConfigDict()
  c.workdir = "/tmp/mixie"  # every stage reads and writes here (local path or gs://)
  c.seed = 0  # one seed for data split, initialisation and sampling

  # --- the frozen base model -----------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.source = "gguf"  # "gguf" (a .gguf file), "hf" (config.json + *.safetensors dir), "random"
  c.model.path = ""  # checkpoint file/dir; "" with source=gguf means the shipped SmolLM2-135M GGUF
  c.model.preset = ""  # with source=random: a preset name from mixie.model.llama.PRESETS
  c.model.dtype = "float32"  # compute dtype: float32, bfloat16 or float16 (mixie.dtypes.DTYPES)
  c.model.param_dtype = "float32"  # storage dtype of the base: float32, bfloat16 or float16
  c.model.attention_impl = ""  # "" lets JAX pick (cuDNN on GPU); "xla" or "cudnn" to force
  c.model.remat = False  # rematerialise layers in the backward pass (long sequences, big bases)

  # --- corpus and held-out split ----------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  # "wiki_summaries" (shipped), "wiki_stdlib" (the summaries + this interpreter's standard library, code
  # and docstrings, labelled by origin: mixie.data.stdlib_corpus), "jsonl", "text", "tfds" or
  # "synthetic" (E known topics for scale simulations: mixie.data.synthetic)
  c.data.source = "wiki_summaries"
  c.data.path = ""  # jsonl: file/dir/glob; text: dir of .txt files; tfds: dataset name (e.g. "c4/en")
  c.data.text_field = "text"  # jsonl/tfds: field holding the document text
  c.data.label_field = ""  # jsonl/tfds: optional field with a reference topic label (for NMI/ARI)
  c.data.split = "train"  # tfds: split to read
  c.data.data_dir = ""  # tfds: data_dir (e.g. gs://bucket/tfds); "" = TFDS default
  c.data.max_docs = 0  # 0 = all; else the first max_docs kept (shipped summaries: in title-hash order)
  c.data.heldout_fraction = 0.05  # fraction of documents held out (by document id, fixed seed)
  c.data.heldout_seed = 0  # salt of the held-out hash; fixed apart from c.seed so runs share one split
  c.data.synthetic_topics = 50  # synthetic: topics E (mixie.data.synthetic; words of the shipped vocab)
  c.data.synthetic_docs_per_topic = 4  # synthetic: documents per topic
  c.data.synthetic_words = 40  # synthetic: words (= tokens) per document
  c.data.synthetic_keywords = 8  # synthetic: keywords per topic
  c.data.synthetic_topic_share = 0.6  # synthetic: fraction of a document's words from its topic's keywords
  c.data.synthetic_seed = 0  # synthetic: seed of the keywords and documents
  # refuse the corpus when more than this share of the records read is unusable (bad JSON, no text
  # field, empty or non-UTF-8 text; exact duplicates do not count); the error names the first such record
  c.data.max_bad_fraction = 0.01

  # --- topics: embed + cluster ----------------------------------------------------------------------
  c.cluster = ml_collections.ConfigDict()
  c.cluster.embedder = "minilm"  # "minilm" (all-MiniLM-L6-v2 in JAX), "base" (the frozen base), "tfidf"
  c.cluster.embed_tokens = 64  # each embedder sees only the first embed_tokens tokens of a document
  c.cluster.embed_batch = 64  # documents per embedding batch
  c.cluster.tfidf_dim = 256  # tfidf: truncated-SVD dimension
  c.cluster.method = "kmeans"  # "kmeans" (MoIN-5k style) or "hdbscan" (UMAP + HDBSCAN, MoIN-500 style)
  c.cluster.k = 12  # kmeans: number of topics
  c.cluster.metric = "cosine"  # kmeans: "cosine" or "l2"
  c.cluster.n_init = 3  # kmeans: restarts (best inertia kept)
  c.cluster.max_iters = 100  # kmeans: Lloyd iterations per restart
  c.cluster.tol = 1e-4  # kmeans: stop when relative inertia change falls below this
  c.cluster.balanced_max_size = 0.0  # kmeans: cap cluster size at this x (n/k); 0 = unbalanced
  c.cluster.chunk = 8192  # kmeans: points per distance chunk (never a full n x k matrix)
  c.cluster.umap_dim = 10  # hdbscan: UMAP output dimension
  c.cluster.umap_neighbors = 15  # hdbscan: UMAP n_neighbors
  c.cluster.min_cluster_size = 50  # hdbscan: min_cluster_size
  c.cluster.silhouette_sample = 2000  # points sampled for the silhouette score

  # --- clustered dataset -----------------------------------------------------------------------------
  c.dataset = ml_collections.ConfigDict()
  c.dataset.seq_len = 128  # T: tokens per packed training row
  c.dataset.small_topics = "merge"  # topics with < one batch of tokens: "merge" into nearest, or "skip"
  c.dataset.max_shard_mb = 1024.0  # ArrayRecord shard size cap in MiB (TFDS sizes shards by bytes)

  # --- LoRA experts -----------------------------------------------------------------------------------
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 8  # r
  c.lora.alpha = 16.0  # scale = alpha / rank
  c.lora.dropout = 0.0  # dropout on the LoRA input
  c.lora.targets = PROJECTIONS  # subset of (q, k, v, o, gate, up, down)

  # --- training ---------------------------------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.mode = "experts"  # "experts" (one per topic), "lora_all" (one LoRA on all data), "full" (CPT)
  c.train.slots = 4  # E: experts trained at once (must divide the mesh's expert axis size evenly)
  c.train.batch_per_slot = 4  # b: rows per slot per step
  c.train.budget = "fixed"  # token budget per expert: "fixed" or "proportional" (to topic size)
  c.train.tokens_per_expert = 16384  # fixed budget, or the mean budget when proportional
  c.train.lr = 1e-3  # peak learning rate
  c.train.full_lr = 0.0  # peak learning rate of the "full" baseline (all weights train); 0 = train.lr
  c.train.warmup_steps = 5  # linear warm-up, per expert
  c.train.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio
  c.train.weight_decay = 0.0  # AdamW decay
  c.train.b1 = 0.9  # Adam beta1
  c.train.b2 = 0.999  # Adam beta2
  c.train.grad_clip = 1.0  # per-expert global-norm clip; 0 = off
  c.train.checkpoint_every = 50  # steps between checkpoints (also on SIGTERM)
  c.train.log_every = 1  # steps between metric lines
  c.train.max_steps = 0  # 0 = until every expert reached its budget
  c.train.schedule = "cosine"  # per-expert LR schedule after warm-up: "cosine" or "constant"
  # trained after the experts, on the same total tokens: "lora_all" (one LoRA on all data, the experts'
  # rank: matched on tokens), "lora_all_wide" (the same at rank E·r for E trained experts, alpha scaled
  # with it: matched on parameters), "full" (continued pre-training of the whole base)
  c.train.baselines = ("lora_all",)
  c.train.wide_rank_cap = 0  # lora_all_wide's rank: min(E·r, this); 0 = no cap (E·r)
  # how experts start: "scratch" (A random, B = 0) or "seed" (every expert branches from the seed
  # adapter, an all-data LoRA of the experts' rank/alpha/targets, with fresh optimizer state)
  c.train.init = "scratch"
  # init="seed": with S = the sum of the experts' scratch budgets (= a scratch row's and lora_all's
  # tokens), the seed trains on seed_fraction * S tokens of all data and each branch on
  # (1 - seed_fraction) of its own budget, so the branched row also costs S tokens; in (0, 1)
  c.train.seed_fraction = 0.5
  c.train.seed_dir = ""  # init="seed": the seed adapter's directory; "" = <workdir>/seed (sweeps share one)
  c.train.run_missing = True  # run the cluster stage when workdir/topics or workdir/dataset is missing
  c.train.keep_checkpoints = 2  # newest checkpoints kept per training run
  c.train.eval_after = True  # end with the held-out perplexity table (base, baselines, experts)
  # divergence (host-side, on the metrics of every step; see mixie.train.divergence): an expert has
  # diverged when its loss ends far above where it started, or when its gradient is exactly zero for
  # several steps in a row (collapsed logits); diverged experts are named in the log, train_summary.json
  # and the evaluation table
  c.train.divergence_window = 3  # steps averaged at the start and at the end of an expert (0 = no loss test)
  c.train.divergence_margin = 1.0  # nats: end mean loss above the start mean by more = diverged
  c.train.divergence_zero_grad_steps = 3  # consecutive steps of gradient norm exactly 0 = diverged (0 = off)
  c.train.allow_divergence = False  # False: a run with a diverged expert exits non-zero after evaluating
  c.train.ce_chunk = 1024  # tokens per chunk of LM head + loss, recomputed in backward (no [b,T,V] logits);
  # a slot whose b x T tokens fit in one chunk keeps its logits instead

  # --- device mesh and sharding rules ---------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # sizes of (expert, data, model); one -1 takes the remaining devices
  c.mesh.axes = ("expert", "data", "model")  # mesh axis names
  # logical axis -> mesh axis (or None = replicated); parameters and activations are sharded by these
  c.mesh.rules = (
      ("expert", "expert"), ("batch", "data"), ("heads", "model"), ("kv_heads", "model"),
      ("mlp", "model"), ("vocab", None), ("embed", None), ("layers", None),
      ("lora_in", None), ("lora_rank", None), ("lora_out", None),
  )

  # --- routing, evaluation, serving -------------------------------------------------------------------
  c.route = ml_collections.ConfigDict()
  c.route.mode = "centroid"  # "centroid", "knn", "topk", or "oracle" (evaluation only)
  c.route.route_tokens = 32  # the router sees only the first route_tokens tokens of a query
  c.route.search = "auto"  # "brute" (exact), "tree" (ScaNN tree + AH + rerank), "auto" (by k), "numpy"
  c.route.tree_threshold = 20000  # auto: ScaNN tree from this many indexed points on, brute force below
  c.route.tree_search_fraction = 0.4  # tree: fraction of the ~sqrt(n) leaves searched per query
  c.route.knn_k = 16  # knn: neighbours voting
  c.route.knn_vote = "majority"  # knn: "majority" (one vote each) or "weighted" (exp(-d^2 / T) each)
  c.route.topk = 2  # topk: experts mixed
  c.route.temperature = 0.1  # topk: softmax(-d^2 / T) weights
  # Fallback: a query whose routing confidence is below the threshold is served by a fallback model
  # (serving, mixie.generate; evaluation reports coverage vs perplexity in workdir/eval/coverage.json).
  c.route.fallback = "none"  # "none" (the routed expert serves all), "base", "lora_all" (workdir/lora_all)
  c.route.confidence = "margin"  # what is thresholded: "margin" (distance to the nearest centroid of
  # another expert minus to the nearest), "distance" (minus the nearest centroid's distance), "vote"
  # (the knn vote share; route.mode = "knn" only)
  c.route.min_confidence = 0.0  # the threshold when route.calibrate = ""; else chosen by calibration
  # The threshold is chosen on a calibration split of TRAINING documents, never on held-out ones: a
  # fixed-seed (c.seed) subset of route.calibrate_docs training documents, each routed on its prefix.
  # They stay in training (carving them out would change every expert and every published number),
  # which is sound because the rules use no expert's perplexity (in-sample on training documents),
  # only whether the prefix route reaches the document's own topic's expert; one document's pull on a
  # centroid fit on a whole topic's full-document embeddings is ~1/topic size (mixie.route.calibrate).
  c.route.calibrate = "precision"  # "" (use min_confidence), "precision" (the lowest threshold whose
  # covered calibration documents reach their own topic's expert at a rate >= calibrate_target: the
  # most coverage at that routing precision), "coverage" (the threshold covering calibrate_target of them)
  c.route.calibrate_target = 0.9  # target routing precision (or coverage), in (0, 1]
  c.route.calibrate_docs = 1000  # training documents in the calibration split (all when fewer)

  c.eval = ml_collections.ConfigDict()
  c.eval.prefix_tokens = (16, 32)  # P: route on the first P tokens, score perplexity after P only
  c.eval.route_modes = ("centroid", "knn", "topk")  # routed rows of the table (with base, baselines, oracle)
  c.eval.max_docs = 0  # 0 = the whole held-out split; else a fixed-seed subset of this many documents
  c.eval.batch = 16  # (document, expert) rows per forward; also the experts held on device while scoring

  c.generate = ml_collections.ConfigDict()
  c.generate.max_new_tokens = 64  # tokens decoded per prompt
  c.generate.temperature = 0.0  # 0 = greedy
  c.generate.top_p = 1.0  # nucleus sampling
  c.generate.top_k = 0  # 0 = off
  c.generate.cache_experts = 16  # on-device expert cache slots (LRU)

  c.serve = ml_collections.ConfigDict()
  # request log of the serving API and mixie.generate: one JSON line per prompt, appended (no raw text;
  # schema in mixie.serve.request_log); a relative path is under workdir; "" = off
  c.serve.log_path = "logs/requests.jsonl"

  # --- expert lifecycle: python -m mixie.experts add / retrain (mixie.lifecycle) --------------------
  c.lifecycle = ml_collections.ConfigDict()
  c.lifecycle.join_quantile = 0.95  # add: a document joins its nearest topic when it lies within the
  # topic's radius, this quantile of the topic's own training documents' distances to its centroid
  c.lifecycle.new_topic_docs = 0  # add: the other documents form round(n / this) new topics (k-means);
  # 0 = the run's median training documents per topic
  c.lifecycle.retrain_joined = False  # add: also retrain the experts of the topics documents joined
  # (False: they keep their weights; `retrain --topic N` uses the joined documents later)

  # --- monitor: python -m mixie.monitor summarises the request log (mixie.monitor) -------------------
  c.monitor = ml_collections.ConfigDict()
  c.monitor.log_path = ""  # the log to read; "" = serve.log_path
  c.monitor.window_s = 3600.0  # length of a time window in seconds (traffic, low-confidence share, drift)
  c.monitor.reference_requests = 200  # drift reference: the log's first requests (by time)
  c.monitor.min_window_requests = 30  # windows with fewer requests are reported but not tested for drift
  c.monitor.drift_ks = 0.25  # drift flag: KS distance of a window's nearest-centroid distances to the
  # reference's at least this (an effect size) ...
  c.monitor.drift_p = 0.01  # ... and the KS test's p-value below this
  c.monitor.dead_min_expected = 5.0  # dead-expert flag: no request served although the expert's
  # training share of the traffic predicts at least this many (fewer: reported as unused, not flagged)
  return c
