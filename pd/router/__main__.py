from pd.router.main import main

main()
