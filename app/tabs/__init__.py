"""One module per tab: handler functions (testable without a server) and the layout that wires them."""
