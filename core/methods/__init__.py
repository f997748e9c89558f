"""Method families. Each family's registry lists its methods: adding a method is one new module
in the family's package plus one line in its registry."""
