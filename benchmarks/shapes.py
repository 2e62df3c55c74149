"""Model shapes the benchmarks share, as config fields (torch-free: ``first_batch.py``'s parent process reads them)."""

# SmolLM2-135M: 576 hidden, 30 layers, 49,152 vocabulary, tied embeddings
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)
