"""Prompts shared by the tests and tests/dist_script.py."""

# Prompts of very different lengths (1 to ~150 tokens) and content.
PROMPTS = [
    "Hi",
    "Tell me what is two plus two?",
    "Write a poem in the style of Leonardo da Vinci about the sea, the sky and the mountains at dawn. " * 4,
    "a",
    "Translate this sentence to Spanish, please: the quick brown fox jumps over the lazy dog.",
    "Unicode: caffè, naïve, über, 你好 🙂",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and more numbers 42 17",
    "What kind of noises did dinosaurs make? " * 6,
    "Once upon a time",
    "Researchers evaluate models on thousands of prompts, and engineers generate data for training. " * 2,
    "The library runs text generation over checkpoints:",
    "   leading and trailing spaces   ",
]
