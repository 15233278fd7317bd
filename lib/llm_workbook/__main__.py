from llm_workbook.cli import main

raise SystemExit(main())
