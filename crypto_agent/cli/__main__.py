from crypto_agent.cli import main

main()
