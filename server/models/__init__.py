"""Model code (Llama family) and loading from Hugging Face model directories."""
