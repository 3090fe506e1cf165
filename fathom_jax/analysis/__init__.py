"""HLO and trace parsing, op categorisation and reports."""
