"""Demo apps launched by `make run`: a ticker publishing prices and a blotter printing them."""
