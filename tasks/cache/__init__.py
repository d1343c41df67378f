"""The teacher soft-target cache (docs/cache-format.md).

- :mod:`.store`: files under a local dir or object store, atomic create/replace, the shard container;
- :mod:`.manifest`: the manifest, shard keys, the cache's one ``key``, the config compatibility check;
- :mod:`.shards`: commit of a shard file and verified reads;
- :mod:`.targets`: the target types (``CachedTargets`` → ``SparseTargets``/``DenseTargets``);
- :mod:`.formats`: one module per format (``sampled``, ``topk``, ``full``);
- :mod:`.sampledpack`: the entropy-coded on-disk layout of ``sampled``;
- :mod:`.encode`: the teacher forward that feeds the encoders.
"""
