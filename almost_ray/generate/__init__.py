"""Generation on Ray: the `generate` stage (`stage`), and the generation pool every stage answers through
(`pool`: one model per replica; vLLM pools on `ray.data.llm`)."""
