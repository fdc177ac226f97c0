"""One module per tab, each exposing TITLE, KEY and build(ctx); ui.app.TABS lists them in order."""
