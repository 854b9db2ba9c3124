"""Speculative decoding (docs/speculative.md): a proposer drafts k tokens per sequence, the target model
verifies them in one step with each sequence's own adapter, and the engine keeps the longest prefix that
matches what the target itself samples."""
