"""Learning strategies for the VQ head beyond a fixed map.

- two_stage: dense warm-up -> k-means of the dense output embeddings gives map + codebook, body warm-started
  (`model.init_from`); `convert_head` is its command-line step (also post-hoc compression of a dense run).
- recluster: re-cluster the map from the model's own input embeddings every N steps
  (`vq.recluster_interval`, called by the trainer).
"""
