from llm_compression.cli import main

raise SystemExit(main())
