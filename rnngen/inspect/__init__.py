"""`rnngen inspect`: recording every unit over a text, text features, the HTML report."""
