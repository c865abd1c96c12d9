"""`tqinfer chat`: the Textual chat app, the plain REPL and the saved conversations (entry: app.run_chat)."""
