print("ttrv")
