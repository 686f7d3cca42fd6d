"""Many runs at once and what they say together: the matrix runner (:mod:`.matrix`) and the report
(:mod:`.report`, :mod:`.plots`), joined by the directory layout of :mod:`.layout`."""
