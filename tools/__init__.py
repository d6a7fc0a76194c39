"""Demo and test tooling (rack-in-a-box, local Ray, tiny models); not shipped."""
